"""``gla``: gated linear attention (Yang et al., 2024), data-dependent decays per key dimension.

``S_t = diag(alpha_t) S_{t-1} + phi(k_t) v_t^T`` and ``o_t = S_t^T phi(q_t) scale`` over a
``[D, Dv]`` state per key/value head (causal only; the state after token ``t`` includes its own
key). ``gate`` holds the log decays ``log(alpha_t) <= 0`` (e.g. ``F.logsigmoid(x) / 16`` as in the
paper): ``[B, Hkv, Nk, D]`` gives one decay per key dimension (GLA's diagonal gate), ``[B, Hkv, Nk]``
one per token and head (scalar gating: "simple GLA", Mamba2-style); ``None`` means no decay (plain
causal linear attention). Unrolled, ``o_i = sum_{j <= i} (phi(q_i) * prod_{j < t <= i} alpha_t) .
phi(k_j) v_j scale``. ``phi`` is the identity by default (the paper's choice); ``feature_map`` picks
another of the shared maps. With ``normalize=True`` the output is divided by the same gated sum
over a value of ones, ``phi(q_i) . z_i`` (needs a non-negative feature map; then the scale cancels
and is not applied; a zero denominator gives a zero row). Causal calls with ``Nq != Nk`` align
bottom-right; padded keys (``kv_mask``) write nothing but their gate still applies.

Forms: chunkwise-parallel (default; every decay factor is ``exp`` of a non-positive difference of
chunk-local cumulative log decays, so gates near 0 or of -20 and below stay finite), the quadratic
``parallel`` form for checking, and one recurrent step per token for decoding: pass the new tokens'
gate slice to ``attnzoo.step(..., gate=g_new)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.features import check_normalizable, feature_map
from ..kernels.linear_state import LinearState
from ..params import param
from ..registry import AttentionOutput, Capabilities, Decoder, Method, Paper, register
from . import _recurrent as rec


@dataclass(frozen=True)
class GLAParams(rec.RecurrentParams):
    chunk_size: int = param(
        128, "tokens per chunk of the chunkwise-parallel form (measured fastest for diagonal gates)"
    )
    gate: Tensor | None = param(  # noqa: RUF009
        None, "log decays <= 0: [B, Hkv, Nk, D] (diagonal) or [B, Hkv, Nk] (scalar); None: no decay"
    )
    feature_map: Literal["identity", "elu", "relu", "softmax"] = param(
        "identity", "phi applied to queries and keys (the paper uses none: identity)"
    )
    normalize: bool = param(False, "divide by phi(q_i) . z_i, the gated sum of phi(k) (non-negative feature map)")

    def validate(self) -> None:
        super().validate()
        check_normalizable(self.feature_map, self.normalize)


def build(call: AttentionCall, p: GLAParams, start: int) -> rec.Recurrence:
    q = feature_map(p.feature_map, call.query)
    k = feature_map(p.feature_map, call.key)
    q = q if p.normalize else q * call.scale
    return rec.Recurrence(q, k, log_decay=rec.as_gate(p.gate), normalize=p.normalize)


def _feature_dim(head_dim: int, p: GLAParams) -> int:
    return head_dim


def _normalize(p: GLAParams) -> bool:
    return p.normalize


def _check_gate(call: AttentionCall, p: GLAParams) -> None:
    rec.check_log_gate("gate", p.gate, call, diagonal=call.head_dim)


_recurrent_form = rec.form_runner(build, "recurrent")


def reference(call: AttentionCall, p: GLAParams) -> AttentionOutput:
    """The recurrent form, token by token: ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``."""
    return _recurrent_form(call, p)


def sample_params(call: AttentionCall, generator: torch.Generator) -> dict[str, Any]:
    """A diagonal gate like a trained one's (decays mostly 0.8 to 1)."""
    return {"gate": rec.sample_log_gate(call, generator, call.head_dim)}


_base_decoder = rec.decoder(build, _feature_dim, _normalize)


def _step(call: AttentionCall, state: LinearState, p: GLAParams) -> tuple[AttentionOutput, LinearState]:
    # a gate given to init_state (not per step) must still fit the step's tokens
    _check_gate(call, p)
    return _base_decoder.step(call, state, p)


GLA = register(
    Method(
        name="gla",
        family="linear",
        exact=False,
        summary=(
            "Gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t scale with "
            "data-dependent log decays `gate` per key dimension [B, Hkv, Nk, D] or per token [B, Hkv, Nk] "
            "(simple GLA / Mamba2-style); causal, unnormalised by default; chunkwise in log space "
            "(O(N C d + N d^2)), decoded in O(1) per token."
        ),
        paper=Paper(
            "Gated Linear Attention Transformers with Hardware-Efficient Training (Yang et al., 2024)",
            "https://arxiv.org/abs/2312.06635",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=False, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=GLAParams,
        reference=reference,
        backends=rec.backends(build),
        test_params=(
            {},
            {"chunk_size": 5},
            {"feature_map": "elu", "normalize": True, "chunk_size": 16},
        ),
        decoder=Decoder(_base_decoder.init_state, _step),
        check=rec.make_check(_feature_dim, _normalize, _check_gate),
        sample_params=sample_params,
        notes=(
            "The recurrent form is the reference; `parallel` materialises the gated N x N weights. The paper's "
            "gate parameterisation (low-rank projection, logsigmoid / 16), output norm and swish gate belong to "
            "the layer."
        ),
    )
)

__all__ = ["GLA", "GLAParams"]
