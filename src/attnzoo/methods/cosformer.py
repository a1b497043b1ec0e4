"""``cosformer``: linear attention with a cos-based re-weighting (Qin et al., 2022, "cosFormer:
Rethinking Softmax in Attention").

``o_i = sum_j s_ij v_j / sum_j s_ij`` over the visible keys (``j <= i`` causal, bottom-right
aligned; all non-causal) with ``s_ij = relu(q_i) . relu(k_j) cos(pi (p_i - p_j) / (2 M))``, where
``p`` are absolute token positions: key ``j`` sits at ``start + j`` and query ``i`` at ``start + i
+ Nk - Nq`` (``start`` is the length of the initial state, 0 without one). The cosine splits as
``cos a cos b + sin a sin b``, so ``s_ij = phi(q_i) . phi(k_j)`` with the ``2D`` features ``phi(x_p)
= [relu(x) cos(pi p / 2M), relu(x) sin(pi p / 2M)]`` and the method is linear attention (the shared
recurrence: chunkwise for training and prefill, O(1) decoding, a ``[2D, Dv]`` state). The weight
only depends on ``p_i - p_j``, so where positions start does not matter (the paper's code counts
from 1); the scale cancels in the normalisation. A zero denominator (no visible key, or relu
features with no overlap) gives a zero row: no ``eps`` (the paper's code clamps the denominator
at 1e-6).

``M = max_len``. The re-weighting is defined for ``|p_i - p_j| < M`` (the cosine stays positive);
positions must lie in ``[0, M)`` (``start + Nk <= M``) and, non-causal, every query-key distance too
(``Nq <= M``: queries before the first key sit at negative positions), else ``ValueError`` naming
``max_len``. Non-causal calls without a state may leave it ``None``: ``M = max(Nq, Nk)`` of the call,
as in the paper's code. Causal calls, decoding and calls with an ``initial_state`` need a fixed
``max_len`` (a length-dependent ``M`` would change every earlier output as the sequence grows), and
it must be the same for every call that shares a state (the state does not record it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.linear_state import compute_dtype
from ..params import param
from ..registry import Capabilities, Decoder, Method, Paper, register
from . import _recurrent as rec


@dataclass(frozen=True)
class CosFormerParams(rec.RecurrentParams):
    max_len: int | None = param(
        None, "M of the re-weighting cos(pi (p_i - p_j) / 2M): positions < M; None (non-causal only) = max(Nq, Nk)"
    )

    def validate(self) -> None:
        super().validate()
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")


def period(call: AttentionCall, p: CosFormerParams, start: int) -> int:
    """``M`` for a call whose first key sits at ``start``; ``ValueError`` naming ``max_len`` if the
    call needs a fixed one or its positions do not fit."""
    if p.max_len is None:
        if call.is_causal or start > 0 or p.initial_state is not None:
            raise ValueError(
                "max_len: causal calls, decoding and calls with an initial_state need a fixed max_len (M of "
                "cos(pi (i - j) / 2M), at least the total sequence length); it defaults to max(Nq, Nk) only for "
                "non-causal calls"
            )
        return max(call.q_len, call.kv_len)
    end = start + call.kv_len
    if end > p.max_len:
        raise ValueError(f"max_len={p.max_len}: key positions reach {end - 1}, but positions must be < max_len")
    if not call.is_causal and call.q_len > p.max_len:
        raise ValueError(
            f"max_len={p.max_len}: {call.q_len} non-causal queries span distances up to {call.q_len - 1} "
            "from the keys; max_len must be at least Nq"
        )
    return p.max_len


def cos_features(x: Tensor, positions: Tensor, m: int) -> Tensor:
    """``[relu(x) cos(pi p / 2M), relu(x) sin(pi p / 2M)]``: ``[B, H, N, D] -> [B, H, N, 2D]``."""
    angle = (math.pi / (2 * m)) * positions.to(x.dtype)[:, None]
    r = torch.relu(x)
    return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)


def build(call: AttentionCall, p: CosFormerParams, start: int) -> rec.Recurrence:
    m = period(call, p, start)
    ct = compute_dtype(call.dtype)
    keys = start + torch.arange(call.kv_len, device=call.device)
    queries = start + call.kv_len - call.q_len + torch.arange(call.q_len, device=call.device)
    q = cos_features(call.query.to(ct), queries, m)
    k = cos_features(call.key.to(ct), keys, m)
    return rec.Recurrence(q, k, normalize=True)


def _feature_dim(head_dim: int, p: CosFormerParams) -> int:
    return 2 * head_dim


def _normalize(p: CosFormerParams) -> bool:
    return True


def _check(call: AttentionCall, p: CosFormerParams) -> None:
    period(call, p, 0 if p.initial_state is None else p.initial_state.length)


_decoder = rec.decoder(build, _feature_dim, _normalize)


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: CosFormerParams):
    if p.max_len is None:
        raise ValueError("max_len: decoding needs a fixed max_len (at least the total length to decode)")
    return _decoder.init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p)


_recurrent_form = rec.form_runner(build, "recurrent")


def reference(call: AttentionCall, p: CosFormerParams):
    """The cos/sin-weighted relu features, then the shared recurrence token by token."""
    return _recurrent_form(call, p)


def _call_params(call: AttentionCall) -> dict[str, Any]:
    """``max_len`` covering the call's keys (causal calls need one; a decoder needs the total length)."""
    return {"max_len": max(call.q_len, call.kv_len)}


COSFORMER = register(
    Method(
        name="cosformer",
        family="linear",
        exact=False,
        summary=(
            "cosFormer: relu(q) . relu(k) re-weighted by cos(pi (i - j) / 2M), which splits into cos/sin-modulated "
            "2D features, so attention is normalised linear attention; causal as a recurrence over a 2D x Dv state "
            "(chunkwise, O(N C d + N d^2), O(1) decoding). Positions are absolute and must stay below max_len."
        ),
        paper=Paper(
            "cosFormer: Rethinking Softmax in Attention (Qin et al., 2022)", "https://arxiv.org/abs/2202.08791"
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=CosFormerParams,
        reference=reference,
        backends=rec.backends(build),
        test_params=(
            {"max_len": 1037},
            {"max_len": 2048, "chunk_size": 16},
            {"max_len": 1100, "chunk_size": 5},
        ),
        call_params=_call_params,
        decoder=Decoder(_init_state, _decoder.step),
        check=rec.make_check(_feature_dim, _normalize, _check),
        notes=(
            "max_len is the M of the paper (its code uses M = max(Nq, Nk) of the call and queries aligned top-left; "
            "here queries align bottom-right and causal calls need a fixed M so that earlier outputs never change)."
        ),
    )
)

__all__ = ["COSFORMER", "CosFormerParams", "cos_features", "period"]
