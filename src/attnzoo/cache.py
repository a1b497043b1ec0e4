"""``Cache``: one decoding state per layer of a model, stepped layer by layer."""

from __future__ import annotations

from typing import Any

import torch

from .decode import DecodeState, init_state, step


class Cache:
    """The decoding states of a ``layers``-deep model, all of one method and shape.

    A model step runs layers ``0, 1, ..., layers - 1`` on the same new tokens: :meth:`step`
    refuses a layer out of that order (a layer stepped twice, or before the layer under it),
    so the layers always agree on the sequence once a model step is done.

    Args:
        method: a method with the ``decode`` capability. Default: `"dense"`.
        layers: number of layers (states), ``>= 1``.
        batch, kv_heads, head_dim, value_dim, dtype, device, **params: as in
            :func:`attnzoo.init_state`, for every layer.

    Examples:
        >>> cache = attnzoo.Cache("sliding_window", layers=2, batch=1, kv_heads=4, head_dim=64, window=(255, 0))
        >>> for layer in range(2):
        ...     h = cache.step(layer, q[layer], k[layer], v[layer])  # [B, H, n_new, D] each
        >>> cache.length, cache.size_bytes()
    """

    def __init__(
        self,
        method: str = "dense",
        *,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **params: Any,
    ) -> None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        self.method = method
        self.layers = layers
        self._options = dict(
            batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, dtype=dtype, device=device
        )
        self._params = params
        self._states: list[DecodeState] = []
        self.reset()

    def reset(self) -> None:
        """Empty every layer's state (a new sequence)."""
        self._states = [init_state(self.method, **self._options, **self._params) for _ in range(self.layers)]

    def step(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **params: Any
    ) -> torch.Tensor:
        """Attend ``n_new`` new tokens at ``layer`` (see :func:`attnzoo.step`); returns
        `[B, Hq, n_new, Dv]`. ``**params`` are per-token parameters of the new tokens (gates)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise ValueError(f"layer must be an int in [0, {self.layers}), got {layer!r}")
        if not isinstance(key, torch.Tensor) or key.dim() < 3:
            raise ValueError(f"key must be a tensor [B, Hkv, n_new, D], got {getattr(key, 'shape', type(key))}")
        n = key.shape[2]
        lengths = [s.length for s in self._states]
        # layer 0 starts a model step once every layer has finished the last one; a later layer
        # catches up with the layer under it
        ahead = lengths[-1] if layer == 0 else lengths[layer - 1] - n
        if lengths[layer] != ahead:
            raise ValueError(
                f"layer: step {layer} out of order: it has seen {lengths[layer]} tokens, the layers hold "
                f"{lengths}; a model step runs layers 0..{self.layers - 1} in order on the same tokens"
            )
        out, self._states[layer] = step(query, key, value, self._states[layer], **params)
        return out

    @property
    def length(self) -> int:
        """Tokens seen by every layer; a ``ValueError`` while a model step is half done."""
        lengths = {s.length for s in self._states}
        if len(lengths) != 1:
            raise ValueError(
                f"the layers disagree on the length: {[s.length for s in self._states]} (a step is half done)"
            )
        return lengths.pop()

    def size_bytes(self) -> int:
        """Bytes held by every layer's state."""
        return sum(s.size_bytes() for s in self._states)

    def __getitem__(self, layer: int) -> DecodeState:
        """The state of ``layer``."""
        return self._states[layer]

    def __len__(self) -> int:
        return self.layers

    def __repr__(self) -> str:
        lengths = sorted({s.length for s in self._states})
        return f"Cache({self.method!r}, layers={self.layers}, length={lengths}, bytes={self.size_bytes()})"


__all__ = ["Cache"]
