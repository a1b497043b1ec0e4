"""``attention()`` and ``explain()``: validate, pick a backend, run it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import NoBackendError
from .inputs import AttentionCall, build_call
from .params import MethodParams
from .registry import REFERENCE, AttentionOutput, Backend, Method, capability_errors, get_method


@dataclass(frozen=True)
class Explanation:
    """Which backend runs a call, and why each other backend would not."""

    method: str
    call: str
    chosen: str | None
    reasons: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"method {self.method!r} for {self.call}:"]
        for name, why in self.reasons.items():
            if name == self.chosen:
                lines.append(f"  {name}: runs")
            elif not why:
                lines.append(f"  {name}: could run (a backend before it was chosen)")
            else:
                lines.append(f"  {name}: " + "; ".join(why))
        if self.chosen is None:
            lines.append("  no backend can run these inputs")
        return "\n".join(lines)


def prepare(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
    *,
    method: Any = "dense",
    kv_mask: Any = None,
    return_lse: Any = False,
    return_state: Any = False,
    **params: Any,
) -> tuple[Method, AttentionCall, MethodParams]:
    """Validate everything a call asks for, before any computation."""
    spec = get_method(method)
    call = build_call(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        kv_mask,
        return_lse,
        return_state,
        spec.capabilities.spatial_dims,
    )
    errors = capability_errors(spec, call)
    if errors:
        raise ValueError("; ".join(errors))
    method_params = spec.params.from_kwargs(spec.name, params)
    if spec.check is not None:
        spec.check(call, method_params)
    return spec, call, method_params


def select_backend(spec: Method, call: AttentionCall, params: MethodParams, backend: Any = None) -> Backend:
    """The first backend with no reasons, or the forced one; raises listing every reason."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        chosen = spec.backend(backend)
        reasons = chosen.why_not(call, params)
        if reasons:
            raise NoBackendError(
                f"backend {backend!r} of method {spec.name!r} cannot run {call.describe()}: " + "; ".join(reasons)
            )
        return chosen
    all_reasons = {}
    for candidate in spec.backends:
        reasons = candidate.why_not(call, params)
        if not reasons:
            return candidate
        all_reasons[candidate.name] = reasons
    lines = "\n".join(f"  {name}: {'; '.join(why)}" for name, why in all_reasons.items())
    raise NoBackendError(
        f"no backend of method {spec.name!r} can run {call.describe()}:\n{lines}\n"
        f"(backend={REFERENCE!r} runs the dense reference)"
    )


def _execute(chosen: Backend, call: AttentionCall, params: MethodParams) -> AttentionOutput:
    return chosen.run(call, params)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    method: str = "dense",
    backend: str | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    return_state: bool = False,
    **params: Any,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Attention by any registered method; a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        query: `[B, Hq, Nq, D]` (spatial methods: `[B, Hq, *spatial, D]`).
        key: `[B, Hkv, Nk, D]`; ``Hq % Hkv == 0`` (GQA/MQA) where the method supports it.
        value: `[B, Hkv, Nk, Dv]`.
        attn_mask: bool (True = visible) or float (added to the scores), broadcastable to
            `[B, Hq, Nq, Nk]`, for methods that honour an arbitrary mask. Unlike SDPA it may be
            combined with ``is_causal``. Default: `None`.
        dropout_p: attention dropout probability, for methods with the ``dropout`` capability.
            Default: `0.0`.
        is_causal: causal masking, aligned bottom-right when ``Nq != Nk`` (query i sees key j iff
            ``j <= i + Nk - Nq``; SDPA aligns top-left). Default: `False`.
        scale: score scale. Default: `1/sqrt(D)`.
        enable_gqa: accepted for SDPA compatibility; GQA is enabled by the head counts. Default: `False`.
        method: a registered method name (``attnzoo.methods()``). Default: `"dense"`.
        backend: force a backend (``"reference"`` runs the dense reference). Default: `None`
            (the first backend that can run the inputs).
        kv_mask: bool `[B, Nk]`, True for real keys: padding, left or right. Default: `None`.
        return_lse: also return the log-sum-exp `[B, Hq, Nq]` (float32; float64 for float64
            inputs; ``-inf`` for rows that see no key). Default: `False`.
        return_state: also return the method's recurrent state. Default: `False`.
        **params: the method's parameters (``attnzoo info METHOD`` lists them).

    Returns:
        ``out`` `[B, Hq, Nq, Dv]` in the input dtype; rows that see no key are 0. With
        ``return_lse`` / ``return_state``: the tuple ``(out, lse)``, ``(out, state)`` or
        ``(out, lse, state)``.

    Raises:
        ValueError, TypeError: invalid inputs or parameters, named in the message, before any
            computation. :class:`attnzoo.errors.NoBackendError` (a ``ValueError``) lists every
            backend's reasons when none can run.

    Examples:
        >>> out = attnzoo.attention(q, k, v)  # == F.scaled_dot_product_attention(q, k, v)
        >>> out, lse = attnzoo.attention(q, k, v, is_causal=True, return_lse=True)
    """
    spec, call, method_params = prepare(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        method=method,
        kv_mask=kv_mask,
        return_lse=return_lse,
        return_state=return_state,
        **params,
    )
    result = _execute(select_backend(spec, call, method_params, backend), call, method_params)
    if not (return_lse or return_state):
        return result.out
    extra = ((result.lse,) if return_lse else ()) + ((result.state,) if return_state else ())
    return (result.out, *extra)


def explain(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    method: str = "dense",
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    return_state: bool = False,
    **params: Any,
) -> Explanation:
    """Which backend :func:`attention` would run for these arguments, and every other backend's
    reasons. Invalid inputs raise exactly as in :func:`attention`. Runs no attention.

    Examples:
        >>> print(attnzoo.explain(q, k, v, is_causal=True, return_lse=True))
    """
    spec, call, method_params = prepare(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        method=method,
        kv_mask=kv_mask,
        return_lse=return_lse,
        return_state=return_state,
        **params,
    )
    reasons = {b.name: b.why_not(call, method_params) for b in spec.backends}
    chosen = next((name for name, why in reasons.items() if not why), None)
    return Explanation(spec.name, call.describe(), chosen, reasons)
