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
    shapes: tuple[int, int, int, int] = (0, 0, 0, 0)  # (batch, kv_heads, head_dim, value_dim) of init_state
    dtype: torch.dtype | None = None

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
    length = int(getattr(inner, "length", 0))
    return DecodeState(spec.name, method_params, inner, length, (batch, kv_heads, head_dim, value_dim), dtype)


def state_size(
    method: str,
    seq_len: int,
    *,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    query_heads: int | None = None,
    **params: Any,
) -> int:
    """Elements a decoding state of ``method`` holds per batch row after ``seq_len`` tokens
    (Zoology's state size): ``state.size_bytes() == state_size(...) * batch * element_size``.

    ``query_heads`` (default ``kv_heads``) counts only for methods whose state also keeps the
    queries (``pbs``, ``cca``). A decoder that declares no formula (``Decoder.state_size``) is
    measured: ``seq_len`` zero tokens decoded in float32, batch 1.

    Examples:
        >>> attnzoo.state_size("dense", 1024, kv_heads=8, head_dim=64)  # 1024 * 8 * (64 + 64)
        1048576
    """
    spec = get_method(method)
    if not spec.capabilities.decode or spec.decoder is None:
        raise ValueError(f"method: {spec.name!r} has no decode capability")
    value_dim = head_dim if value_dim is None else value_dim
    query_heads = kv_heads if query_heads is None else query_heads
    sizes = (("seq_len", seq_len, 0), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1))
    sizes += (("value_dim", value_dim, 1), ("query_heads", query_heads, 1))
    for name, size, low in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < low:
            raise ValueError(f"{name} must be an int >= {low}, got {size!r}")
    if query_heads % kv_heads:
        raise ValueError(f"query_heads ({query_heads}) must be a multiple of kv_heads ({kv_heads})")
    method_params = spec.params.from_kwargs(spec.name, params)
    if spec.decoder.state_size is not None:
        return int(spec.decoder.state_size(seq_len, kv_heads, head_dim, value_dim, method_params, query_heads))
    # a decoder that declares no formula (sigmoid's, the linear family's): measured on zeros
    state = init_state(spec.name, batch=1, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, **params)
    if seq_len:
        q = torch.zeros(1, query_heads, seq_len, head_dim)
        k, v = torch.zeros(1, kv_heads, seq_len, head_dim), torch.zeros(1, kv_heads, seq_len, value_dim)
        state = step(q, k, v, state)[1]
    return state.size_bytes() // 4  # float32 states for float32 inputs


def decode_semantics(method: str, **params: Any) -> str:
    """What a decode step of ``method`` equals: ``"full"`` (the rows of causal attention over
    the whole sequence), ``"prefix"`` (the last rows of causal attention over the tokens seen so
    far) or ``"cross"`` (causal attention of the step's queries over every key seen so far)."""
    spec = get_method(method)
    if spec.decoder is None:
        raise ValueError(f"method: {spec.name!r} has no decode capability")
    return spec.decoder.semantics(spec.params.from_kwargs(spec.name, params))


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
        ``(out [B, Hq, n_new, Dv], new_state)``: the matching rows of causal attention over the
        whole sequence, or what :func:`decode_semantics` names for methods whose rows depend on
        later queries (``docs/decode.md``).
    """
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must come from attnzoo.init_state, got {type(state).__name__}")
    spec = get_method(state.method)
    call = build_call(query, key, value, None, 0.0, True, scale, False, None, False, False)
    _check_tokens(key, value, state)
    if call.q_len != call.kv_len:
        raise ValueError(f"query and key must hold the same new tokens, got {call.q_len} and {call.kv_len}")
    step_params = state.params
    if params:
        step_params = spec.params.from_kwargs(spec.name, {**state.params.as_dict(), **params})
        if spec.check is not None:
            spec.check(call, step_params)
    result, inner = spec.decoder.step(call, state.inner, step_params)
    return result.out, DecodeState(
        state.method, state.params, inner, state.length + call.q_len, state.shapes, state.dtype
    )


def _check_tokens(key: torch.Tensor, value: torch.Tensor, state: DecodeState) -> None:
    """New keys `[B, Hkv, n, D]` and values `[B, Hkv, n, Dv]` in the state's shape and dtype
    (every method's state, whatever its decoder checks)."""
    if state.dtype is None:
        return
    batch, kv_heads, head_dim, value_dim = state.shapes
    for name, tensor, dim in (("key", key, head_dim), ("value", value, value_dim)):
        shape = list(tensor.shape)
        if shape[:2] != [batch, kv_heads] or shape[-1] != dim or tensor.dtype != state.dtype:
            raise ValueError(
                f"{name} {shape} {tensor.dtype} does not fit the state: expected [{batch}, {kv_heads}, n_new, {dim}] "
                f"{state.dtype} (from init_state)"
            )
