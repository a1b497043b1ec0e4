"""``lightning``: Lightning Attention-2 (Qin et al., 2024), linear attention with a constant decay.

``o_i = sum_{j <= i} lambda_h^(i - j) (q_i . k_j) scale v_j``: causal, unnormalised, identity
features, one constant decay ``lambda_h`` in (0, 1] per key/value head. With ``decay=None`` the
heads get Lightning's ALiBi-style decays ``lambda_h = exp(-slope_h)`` with the slopes of the
paper's ``_build_slope_tensor`` for ``H`` = the number of key/value heads: ``slope_h =
2^(-8 (h + 1) / H)`` when ``H`` is a power of two; otherwise the ``P`` slopes of the largest power
of two ``P < H``, followed by every other slope of ``2 P`` heads (``slope_{2P}(1), slope_{2P}(3),
...``) up to ``H`` slopes (ALiBi's rule). A float gives every head one decay, a tuple one per
key/value head.

Scale: Lightning's kernel multiplies by no scale, fla's wrapper by ``1/sqrt(D)``. Here the
library's ``scale`` applies (default ``1/sqrt(D)``); pass ``scale=1.0`` to reproduce Lightning's
kernel. TransNormerLLM multiplies the slopes of layer ``l`` of ``L`` by ``1 - l / (L - 1) + 1e-5``:
that is the layer's choice, made by passing ``decay=lightning_decays(H, layer_idx=l,
num_layers=L)``.

The paper's algorithm (intra-block masked attention plus an inter-block state carried between
blocks) is exactly the chunkwise-parallel form of the shared recurrence with a constant decay:
``chunk_size`` is Lightning's block size. ``parallel`` materialises ``(Q K^T * M) V`` with
``M_ij = lambda^(i - j)`` (for checking), and decoding is one recurrent step per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..inputs import AttentionCall
from ..params import param
from ..registry import AttentionOutput, Capabilities, Method, Paper, register
from . import _recurrent as rec
from .retention import RetentionParams, check_decay_heads, decayed_builder


def lightning_slopes(heads: int) -> tuple[float, ...]:
    """ALiBi's slopes for ``heads`` heads, as Lightning Attention builds them."""
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    power = 2 ** math.floor(math.log2(heads))
    first = tuple(2.0 ** (-8.0 * (h + 1) / power) for h in range(power))
    if power == heads:
        return first
    return first + lightning_slopes(2 * power)[0::2][: heads - power]


def lightning_decays(heads: int, layer_idx: int | None = None, num_layers: int | None = None) -> tuple[float, ...]:
    """``exp(-slope_h)`` per head; with ``layer_idx`` and ``num_layers`` the slopes are first scaled by
    TransNormerLLM's ``1 - layer_idx / (num_layers - 1) + 1e-5``."""
    factor = 1.0
    if layer_idx is not None or num_layers is not None:
        if layer_idx is None or num_layers is None or num_layers < 2 or not 0 <= layer_idx < num_layers:
            raise ValueError(
                f"layer_idx and num_layers go together, 0 <= layer_idx < num_layers and num_layers >= 2; "
                f"got layer_idx={layer_idx}, num_layers={num_layers}"
            )
        factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return tuple(math.exp(-s * factor) for s in lightning_slopes(heads))


@dataclass(frozen=True)
class LightningParams(RetentionParams):
    decay: float | tuple[float, ...] | None = param(
        None, "lambda in (0, 1]: one float, or one per key/value head; None: exp(-ALiBi slope) per head"
    )


build = decayed_builder(lightning_decays)
_recurrent_form = rec.form_runner(build, "recurrent")


def reference(call: AttentionCall, p: LightningParams) -> AttentionOutput:
    """The recurrent form, token by token: ``S_t = lambda S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t scale``."""
    return _recurrent_form(call, p)


def _feature_dim(head_dim: int, p: LightningParams) -> int:
    return head_dim


def _no_normalize(p: LightningParams) -> bool:
    return False


LIGHTNING = register(
    Method(
        name="lightning",
        family="linear",
        exact=False,
        summary=(
            "Lightning Attention-2: causal linear attention with a constant per-head decay, o_i = sum_{j<=i} "
            "lambda_h^(i-j) (q_i . k_j) scale v_j, lambda_h = exp(-ALiBi slope_h) by default; intra-block masked "
            "attention plus an inter-block state (the chunkwise form, O(N C d + N d^2)), decoded in O(1) per token."
        ),
        paper=Paper(
            "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models "
            "(Qin et al., 2024)",
            "https://arxiv.org/abs/2401.04658",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=False, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=LightningParams,
        reference=reference,
        backends=rec.backends(build),
        test_params=(
            {},
            {"decay": 0.95, "chunk_size": 5},
            {"chunk_size": 16},
        ),
        decoder=rec.decoder(build, _feature_dim, _no_normalize),
        check=rec.make_check(_feature_dim, _no_normalize, check_decay_heads),
        notes=(
            "scale=1.0 reproduces Lightning's kernel (which applies no scale). chunk_size is the paper's block "
            "size. Identical to `gla` with the constant scalar gate log(lambda_h)."
        ),
    )
)

__all__ = ["LIGHTNING", "LightningParams", "lightning_decays", "lightning_slopes"]
