"""``linear``: kernelised linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

``o_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)`` over the visible keys
(``j <= i`` causal, all non-causal), with ``phi`` one of :data:`attnzoo.kernels.features.FEATURE_MAPS`.
With ``normalize=False`` the denominator is dropped and the query features are multiplied by
``scale`` (default ``1/sqrt(D)``; under normalisation a scale cancels). A query whose
denominator is 0 (no visible key, or relu features all zero) gets a zero row. Causal calls run
as a recurrence over a ``[D, Dv]`` state: the chunkwise form for training and prefill, one step
per token for decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..inputs import AttentionCall
from ..kernels.features import check_normalizable, feature_map
from ..params import param
from ..registry import Capabilities, Method, Paper, register
from . import _recurrent as rec


@dataclass(frozen=True)
class LinearParams(rec.RecurrentParams):
    feature_map: Literal["elu", "relu", "identity", "softmax"] = param(
        "elu", "phi applied to queries and keys: elu(x)+1, relu, identity, softmax over features"
    )
    normalize: bool = param(True, "divide by phi(q) . sum phi(k) (needs a non-negative feature map)")

    def validate(self) -> None:
        super().validate()
        check_normalizable(self.feature_map, self.normalize)


def build(call: AttentionCall, p: LinearParams, start: int) -> rec.Recurrence:
    q = feature_map(p.feature_map, call.query)
    k = feature_map(p.feature_map, call.key)
    return rec.Recurrence(q if p.normalize else q * call.scale, k, normalize=p.normalize)


def _feature_dim(head_dim: int, p: LinearParams) -> int:
    return head_dim


def _normalize(p: LinearParams) -> bool:
    return p.normalize


LINEAR = register(
    Method(
        name="linear",
        family="linear",
        exact=False,
        summary=(
            "Kernelised linear attention phi(q) (sum phi(k) v^T) / phi(q) . sum phi(k) with phi = elu+1, relu, "
            "identity or softmax over features; causal as a recurrence over a D x Dv state, run chunkwise "
            "(O(N C d + N d^2)) and decoded in O(1) per token."
        ),
        paper=Paper(
            "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention "
            "(Katharopoulos et al., 2020)",
            "https://arxiv.org/abs/2006.16236",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=LinearParams,
        reference=rec.form_runner(build, "recurrent"),
        backends=rec.backends(build),
        test_params=(
            {},
            {"feature_map": "relu", "chunk_size": 16},
            {"feature_map": "identity", "normalize": False, "chunk_size": 5},
            {"feature_map": "softmax"},
        ),
        decoder=rec.decoder(build, _feature_dim, _normalize),
        check=rec.make_check(_feature_dim, _normalize),
        notes="The recurrent form is the reference; `parallel` materialises the N x N weights (for checking).",
    )
)

__all__ = ["LINEAR", "LinearParams"]
