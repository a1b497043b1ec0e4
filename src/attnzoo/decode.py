"""Token-by-token decoding: ``init_state`` and ``step`` for methods with the ``decode`` capability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .inputs import build_call
from .params import MethodParams
from .registry import get_method


@dataclass(frozen=True)
class DecodeState:
    """A method's decoding state with the method and parameters it belongs to."""

    method: str
    params: MethodParams
    inner: Any
    length: int

    def size_bytes(self) -> int:
        """Bytes held by the state (Zoology's state size)."""
        return int(self.inner.size_bytes())


def init_state(
    method: str = "dense",
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **params: Any,
) -> DecodeState:
    """An empty decoding state for ``method``.

    Examples:
        >>> state = attnzoo.init_state("dense", batch=1, kv_heads=2, head_dim=64)
        >>> out, state = attnzoo.step(q_new, k_new, v_new, state)  # [B, H, n_new, D] each
    """
    spec = get_method(method)
    if not spec.capabilities.decode or spec.decoder is None:
        raise ValueError(f"method: {spec.name!r} has no decode capability")
    value_dim = head_dim if value_dim is None else value_dim
    for name, size in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("value_dim", value_dim)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    method_params = spec.params.from_kwargs(spec.name, params)
    inner = spec.decoder.init_state(batch, kv_heads, head_dim, value_dim, dtype, torch.device(device), method_params)
    # a state continued from a prefill (recurrent methods' ``initial_state``) knows its length
    return DecodeState(spec.name, method_params, inner, int(getattr(inner, "length", 0)))


def step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: DecodeState,
    *,
    scale: float | None = None,
    **params: Any,
) -> tuple[torch.Tensor, DecodeState]:
    """Attend ``n_new >= 1`` new tokens causally after everything in ``state``.

    Args:
        query: `[B, Hq, n_new, D]`.
        key: `[B, Hkv, n_new, D]`.
        value: `[B, Hkv, n_new, Dv]`.
        state: from :func:`init_state` or a previous ``step``.
        scale: score scale. Default: `1/sqrt(D)`.
        **params: per-token parameters of the new tokens (gates ``[B, Hkv, n_new, ...]``, write
            strengths), for methods that take them; they replace the state's for this step.

    Returns:
        ``(out [B, Hq, n_new, Dv], new_state)``; equal to the matching rows of causal attention over
        the whole sequence.
    """
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must come from attnzoo.init_state, got {type(state).__name__}")
    spec = get_method(state.method)
    call = build_call(query, key, value, None, 0.0, True, scale, False, None, False, False)
    if call.q_len != call.kv_len:
        raise ValueError(f"query and key must hold the same new tokens, got {call.q_len} and {call.kv_len}")
    step_params = state.params
    if params:
        step_params = spec.params.from_kwargs(spec.name, {**state.params.as_dict(), **params})
        if spec.check is not None:
            spec.check(call, step_params)
    result, inner = spec.decoder.step(call, state.inner, step_params)
    return result.out, DecodeState(state.method, state.params, inner, state.length + call.q_len)
