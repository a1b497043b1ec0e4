"""What every linear / gated-recurrent method shares: parameters, the three forms as reference and
backends, padding, causal alignment, states, decode and input checks.

A method describes itself by a ``build(call, params, start) -> Recurrence`` function: its query
and key features, decay, write strengths and rule for the call (``start`` is the absolute
position of the call's first key, for position-dependent feature maps). Everything else comes
from :func:`recurrent_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.linear import linear_attention
from ..kernels.linear_state import LinearState, check_state, empty_state
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Decoder


@dataclass(frozen=True)
class RecurrentParams(MethodParams):
    """Parameters every recurrent method has (subclasses add their own, all with defaults)."""

    chunk_size: int = param(64, "tokens per chunk of the chunkwise-parallel form")
    initial_state: LinearState | None = param(None, "the state before the first token (from return_state=True)")  # noqa: RUF009

    def validate(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass(frozen=True)
class Recurrence:
    """A call in the core's terms. ``q [B, Hq, Nq, F]`` and ``k [B, Hkv, Nk, F]`` are features
    (scale applied), ``v`` defaults to the call's values, ``log_decay`` is ``[B, Hkv, Nk, 1 or F]``
    (<= 0) or ``None``, ``beta [B, Hkv, Nk]`` the delta-rule write strengths."""

    q: Tensor
    k: Tensor
    v: Tensor | None = None
    log_decay: Tensor | None = None
    beta: Tensor | None = None
    rule: str = "add"
    normalize: bool = False


Build = Callable[[AttentionCall, Any, int], Recurrence]


def run(call: AttentionCall, p: RecurrentParams, rec: Recurrence, form: str, state: LinearState | None = None):
    """Run a recurrence; returns ``(out [B, Hq, Nq, Dv] in the input dtype, final LinearState)``.

    Padded keys (``kv_mask``) write nothing (zero key features); their decay still applies.
    Causal calls with ``Nq != Nk`` align bottom-right: query ``i`` reads the state after key
    ``i + Nk - Nq`` (rows before the first key are 0).
    """
    k, v = rec.k, call.value if rec.v is None else rec.v
    if call.kv_mask is not None:
        k = k * call.kv_mask[:, None, :, None].to(k.dtype)
    q, off = rec.q, call.kv_len - call.q_len
    if call.is_causal and off > 0:  # more keys than queries: the first keys have no query
        q = torch.cat([q.new_zeros(*q.shape[:2], off, q.shape[-1]), q], dim=2)
    elif call.is_causal and off < 0:  # more queries than keys: the first rows see nothing
        q = q[:, :, -off:]
    out, final = linear_attention(
        q,
        k,
        v,
        causal=call.is_causal,
        log_decay=rec.log_decay,
        beta=rec.beta,
        rule=rec.rule,
        normalize=rec.normalize,
        initial_state=p.initial_state if state is None else state,
        form=form,
        chunk_size=p.chunk_size,
    )
    if call.is_causal and off > 0:
        out = out[:, :, off:]
    elif call.is_causal and off < 0:
        out = torch.cat([out.new_zeros(*out.shape[:2], -off, out.shape[-1]), out], dim=2)
    return out.to(call.dtype), final


def _start(p: RecurrentParams) -> int:
    return 0 if p.initial_state is None else p.initial_state.length


def form_runner(build: Build, form: str) -> Callable[[AttentionCall, Any], AttentionOutput]:
    def runner(call: AttentionCall, p: Any) -> AttentionOutput:
        out, state = run(call, p, build(call, p, _start(p)), form)
        return AttentionOutput(out, None, state if call.return_state else None)

    runner.__name__ = f"{form}_form"
    runner.__doc__ = {
        "recurrent": "The recurrence token by token, from its definition (the method's build gives the features, "
        "decays and rule): S_t = alpha_t S_{t-1} + write_t, o_t = S_t^T q_t.",
        "chunk": "The chunkwise-parallel form of the shared recurrence (kernels.linear).",
        "parallel": "The quadratic form of the shared recurrence, weights materialised (kernels.linear).",
    }[form]
    return runner


def backends(build: Build) -> tuple[Backend, ...]:
    """The chunkwise-parallel form (default) and the quadratic parallel form (for checking); the
    registry's reference is the recurrent form."""
    return (
        Backend("chunk", form_runner(build, "chunk"), description="chunkwise-parallel: O(N C d + N d^2)"),
        Backend("parallel", form_runner(build, "parallel"), description="quadratic, weights materialised (checking)"),
    )


def decoder(build: Build, feature_dim: Callable[[int, Any], int], normalize: Callable[[Any], bool]) -> Decoder:
    """Decoding: the state is a :class:`LinearState`; a step runs the new tokens through the
    chunk form from it (one token or a chunked prefill), O(1) in the position. ``init_state``
    with ``initial_state=`` (a prefill's ``return_state``) continues from that state."""

    def init(batch, kv_heads, head_dim, value_dim, dtype, device, p):
        f = feature_dim(head_dim, p)
        if p.initial_state is not None:  # continue after a prefill (``return_state=True``)
            return check_state(p.initial_state, batch, kv_heads, f, value_dim, normalize(p), dtype)
        return empty_state(batch, kv_heads, f, value_dim, normalize(p), dtype, device)

    def step(call: AttentionCall, state: LinearState, p: Any):
        out, new = run(call, p, build(call, p, state.length), "chunk", state)
        return AttentionOutput(out), new

    def size(seq_len: int, kv_heads: int, head_dim: int, value_dim: int, p: Any, query_heads: int) -> int:
        """``Dk x Dv`` (and the ``Dk`` normaliser) per key/value head, whatever the length."""
        f = feature_dim(head_dim, p)
        return kv_heads * f * (value_dim + (1 if normalize(p) else 0))

    return Decoder(init, step, size)


def make_check(
    feature_dim: Callable[[int, Any], int],
    normalize: Callable[[Any], bool],
    extra: Callable[[AttentionCall, Any], None] | None = None,
) -> Callable[[AttentionCall, Any], None]:
    """``Method.check``: the initial state's shape and dtype, then the method's own checks."""

    def check(call: AttentionCall, p: Any) -> None:
        if p.initial_state is not None:
            f = feature_dim(call.head_dim, p)
            check_state(p.initial_state, call.batch, call.kv_heads, f, call.value_dim, normalize(p), call.dtype)
        if extra is not None:
            extra(call, p)

    return check


# -- checks and samples of data-dependent parameters ------------------------------------------


def check_log_gate(name: str, gate: Any, call: AttentionCall, diagonal: int | None = None) -> None:
    """A log decay per token: ``[B, Hkv, Nk]`` (scalar), or ``[B, Hkv, Nk, diagonal]``; finite and
    ``<= 0`` (decays in (0, 1])."""
    if gate is None:
        return
    scalar = [call.batch, call.kv_heads, call.kv_len]
    shapes = [scalar] + ([[*scalar, diagonal]] if diagonal else [])
    if list(gate.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {expected} ([B, Hkv, Nk(, Dk)]), got {list(gate.shape)}")
    if not gate.is_floating_point() or gate.device != call.device:
        raise ValueError(f"{name} must be a floating tensor on {call.device}, got {gate.dtype} on {gate.device}")
    if not bool(torch.isfinite(gate).all()) or bool((gate > 0).any()):
        raise ValueError(f"{name} holds log decays: finite and <= 0 (decays in (0, 1]); use e.g. F.logsigmoid(x)")


def check_beta(beta: Any, call: AttentionCall, high: float = 2.0) -> None:
    """Delta-rule write strengths ``[B, Hkv, Nk]`` in ``[0, high]``."""
    if beta is None:
        return
    expected = [call.batch, call.kv_heads, call.kv_len]
    if list(beta.shape) != expected:
        raise ValueError(f"beta must have shape [B, Hkv, Nk] = {expected}, got {list(beta.shape)}")
    if not beta.is_floating_point() or beta.device != call.device:
        raise ValueError(f"beta must be a floating tensor on {call.device}, got {beta.dtype} on {beta.device}")
    if not bool(torch.isfinite(beta).all()) or bool((beta < 0).any()) or bool((beta > high).any()):
        raise ValueError(f"beta must lie in [0, {high:g}] (write strengths, e.g. torch.sigmoid(x))")


def check_decay(decay: Any, heads: int) -> None:
    """A constant decay: one float, or one per key/value head, each in (0, 1]."""
    values = decay if isinstance(decay, tuple) else (decay,)
    if isinstance(decay, tuple) and len(decay) not in (1, heads):
        raise ValueError(f"decay must be one float or one per key/value head ({heads}), got {len(decay)} values")
    for d in values:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {d!r}")


def constant_log_decay(decay: float | tuple[float, ...], call: AttentionCall) -> Tensor:
    """``log(decay)`` per key/value head, expanded to ``[B, Hkv, Nk, 1]``."""
    values = torch.as_tensor(decay if isinstance(decay, tuple) else (decay,), dtype=torch.float64)
    log = values.log().to(device=call.device).expand(call.kv_heads)
    return log.view(1, -1, 1, 1).expand(call.batch, call.kv_heads, call.kv_len, 1)


def sample_log_gate(call: AttentionCall, gen: torch.Generator, diagonal: int | None = None) -> Tensor:
    """Random log decays like a trained gate's: ``logsigmoid(x + 3)``, decays mostly 0.8 to 1."""
    shape = (call.batch, call.kv_heads, call.kv_len) + ((diagonal,) if diagonal else ())
    return torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen) + 3.0).to(call.device)


def sample_beta(call: AttentionCall, gen: torch.Generator) -> Tensor:
    return torch.sigmoid(torch.randn(call.batch, call.kv_heads, call.kv_len, generator=gen)).to(call.device)


def as_gate(gate: Tensor | None) -> Tensor | None:
    """A validated gate ``[B, H, N]`` or ``[B, H, N, F]`` as the core's ``[B, H, N, 1 or F]``."""
    if gate is None:
        return None
    return gate[..., None] if gate.dim() == 3 else gate


__all__ = [
    "Recurrence",
    "RecurrentParams",
    "as_gate",
    "backends",
    "check_beta",
    "check_decay",
    "check_log_gate",
    "constant_log_decay",
    "decoder",
    "form_runner",
    "make_check",
    "run",
    "sample_beta",
    "sample_log_gate",
]
