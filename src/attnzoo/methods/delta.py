"""``delta`` (DeltaNet) and ``gated_delta`` (Gated DeltaNet): linear attention with the delta rule.

``delta`` (Schlag et al., 2021; parallelised over the sequence by Yang et al., 2024): per batch
element and key/value head a state ``S [D, Dv]`` is updated token by token as

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t,

i.e. the state first reads the value it currently stores for ``k_t`` and moves it towards ``v_t``
by ``beta_t`` (with ``beta_t = 1`` and a unit key it *replaces* that value: the state stores only
the last value written under a key). ``gated_delta`` (Yang et al., 2025) adds a scalar decay
``alpha_t = exp(gate_t)`` per token: ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``;
without a gate it equals ``delta``.

Conventions:

* ``qk_norm=True`` (default, fla's ``use_qk_l2norm_in_kernel``): queries and keys are
  L2-normalised over the head dim inside the method (a zero vector stays zero, no NaN), then the
  query is multiplied by ``scale`` (default ``1/sqrt(D)``). With ``qk_norm=False`` the caller must
  pass keys with ``beta_t ||k_t||^2 <= 2`` (in practice unit keys): the transition
  ``I - beta k k^T`` has the eigenvalue ``1 - beta ||k||^2`` along ``k``, and outside ``[-1, 1]`` the
  state grows exponentially with the length.
* ``beta [B, Hkv, Nk]`` in ``[0, 2]`` (``None``: 1), e.g. ``sigmoid(x)`` or ``2 sigmoid(x)``.
  Values above 1 give the transition a negative eigenvalue ``1 - beta`` along ``k`` (Grazzi et
  al., 2024, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"); ``beta = 2``
  reflects the state about the plane orthogonal to ``k``; ``beta = 0`` writes nothing.
* ``gate [B, Hkv, Nk]``: log decays ``<= 0`` (e.g. ``F.logsigmoid(x)``), one scalar per token;
  ``None`` is no decay.
* Causal only (the read-out is the state after the query's own token). ``Nq != Nk`` aligns
  bottom-right; a padded key (``kv_mask``) writes nothing, while its gate still decays the state.

Runs as the chunkwise WY/UT form of the shared core for training and prefill (``chunk``), the
token loop as the reference, and decodes in O(1) per token from a
:class:`~attnzoo.kernels.linear_state.LinearState`. The core's quadratic ``parallel`` form is not a
backend: its one N x N triangular solve (and, gated, its sequence-wide cumulative log decay) is
5-10x less accurate in float32 at N = 1000 than the token loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.linear_state import compute_dtype
from ..params import param
from ..registry import Capabilities, Method, Paper, register
from . import _recurrent as rec


@dataclass(frozen=True)
class DeltaParams(rec.RecurrentParams):
    beta: Tensor | None = param(None, "write strengths [B, Hkv, Nk] in [0, 2]; None: 1")  # noqa: RUF009
    qk_norm: bool = param(True, "L2-normalise queries and keys over the head dim (keys must be unit for stability)")


@dataclass(frozen=True)
class GatedDeltaParams(DeltaParams):
    gate: Tensor | None = param(None, "log decays [B, Hkv, Nk] (<= 0, one per token); None: no decay")  # noqa: RUF009


def _features(call: AttentionCall, p: DeltaParams) -> tuple[Tensor, Tensor]:
    """Queries (scaled) and keys in the compute dtype, L2-normalised with ``qk_norm``."""
    ct = compute_dtype(call.dtype)
    q, k = call.query.to(ct), call.key.to(ct)
    if p.qk_norm:  # F.normalize divides by max(||x||, eps): a zero vector gives 0, not NaN
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q * call.scale, k


def build(call: AttentionCall, p: DeltaParams, start: int) -> rec.Recurrence:
    q, k = _features(call, p)
    return rec.Recurrence(q, k, beta=p.beta, rule="delta")


def build_gated(call: AttentionCall, p: GatedDeltaParams, start: int) -> rec.Recurrence:
    q, k = _features(call, p)
    return rec.Recurrence(q, k, log_decay=rec.as_gate(p.gate), beta=p.beta, rule="delta")


def _check(call: AttentionCall, p: DeltaParams) -> None:
    rec.check_beta(p.beta, call)


def _check_gated(call: AttentionCall, p: GatedDeltaParams) -> None:
    rec.check_beta(p.beta, call)
    rec.check_log_gate("gate", p.gate, call)


def _sample(call: AttentionCall, gen: torch.Generator) -> dict[str, Any]:
    return {"beta": rec.sample_beta(call, gen)}


def _sample_gated(call: AttentionCall, gen: torch.Generator) -> dict[str, Any]:
    return {"beta": rec.sample_beta(call, gen), "gate": rec.sample_log_gate(call, gen)}


def _feature_dim(head_dim: int, p: Any) -> int:
    return head_dim


def _normalize(p: Any) -> bool:
    return False


CAPABILITIES = Capabilities(causal=True, noncausal=False, cross=True, gqa=True, kv_mask=True, decode=True, state=True)
# Only the chunkwise form is a backend: the quadratic `parallel` form solves one N x N triangular system
# (and, gated, takes exponents of a sequence-wide cumulative log decay), which at N = 1000 in float32 is
# 5-10x less accurate than the token loop (the gold rule's bound); it stays available in the core.
BACKENDS = rec.backends(build)[:1]
BACKENDS_GATED = rec.backends(build_gated)[:1]
TEST_PARAMS = ({}, {"chunk_size": 16}, {"chunk_size": 5})
NOTES = (
    "Causal only. The recurrent form is the reference; `chunk` is the WY/UT chunkwise form (the "
    "core's quadratic `parallel` form is not a backend: it loses float32 accuracy on long sequences). "
    "Keys are L2-normalised inside (qk_norm=True); with qk_norm=False pass unit keys."
)

DELTA = register(
    Method(
        name="delta",
        family="linear",
        exact=False,
        summary=(
            "DeltaNet: linear attention whose D x Dv state is updated by the delta rule S += beta k (v - S^T k)^T "
            "(each write replaces the value stored under its key by a fraction beta in [0, 2]) and read as "
            "S^T q; L2-normalised queries and keys; causal, chunkwise-parallel via the WY/UT transform "
            "(O(N C d + N d^2)), decoded in O(1) per token."
        ),
        paper=Paper(
            "Parallelizing Linear Transformers with the Delta Rule over Sequence Length (Yang et al., 2024)",
            "https://arxiv.org/abs/2406.06484",
        ),
        capabilities=CAPABILITIES,
        params=DeltaParams,
        reference=rec.form_runner(build, "recurrent"),
        backends=BACKENDS,
        test_params=TEST_PARAMS,
        decoder=rec.decoder(build, _feature_dim, _normalize),
        check=rec.make_check(_feature_dim, _normalize, _check),
        sample_params=_sample,
        notes=NOTES,
    )
)

GATED_DELTA = register(
    Method(
        name="gated_delta",
        family="linear",
        exact=False,
        summary=(
            "Gated DeltaNet: the delta rule with a data-dependent scalar decay per token, "
            "S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, read as S^T q; the gate forgets "
            "globally, the delta rule overwrites per key. Causal, chunkwise WY/UT form with chunk-local log "
            "decays (no positive exponent), decoded in O(1) per token."
        ),
        paper=Paper(
            "Gated Delta Networks: Improving Mamba2 with Delta Rule (Yang et al., 2025)",
            "https://arxiv.org/abs/2412.06464",
        ),
        capabilities=CAPABILITIES,
        params=GatedDeltaParams,
        reference=rec.form_runner(build_gated, "recurrent"),
        backends=BACKENDS_GATED,
        test_params=TEST_PARAMS,
        decoder=rec.decoder(build_gated, _feature_dim, _normalize),
        check=rec.make_check(_feature_dim, _normalize, _check_gated),
        sample_params=_sample_gated,
        notes=NOTES + " Without a gate it equals `delta`.",
    )
)

__all__ = ["DELTA", "GATED_DELTA", "DeltaParams", "GatedDeltaParams"]
