"""``retention``: multi-scale retention, the token mixer of RetNet (Sun et al., 2023).

``o_i = sum_{j <= i} gamma_h^(i - j) (q_i . k_j) scale v_j``: causal, unnormalised, identity
features, one constant decay ``gamma_h`` in (0, 1] per key/value head (query heads of a GQA group
share their key/value head's decay). With ``decay=None`` the heads get RetNet's multi-scale decays
``gamma_h = 1 - 2^(-5 - h)`` for ``h = 0 .. Hkv - 1`` (computed from the call); a float gives every
head one decay and a tuple one per key/value head. ``scale`` defaults to ``1/sqrt(D)`` (RetNet's
reference code scales the keys by it). Causal calls with ``Nq != Nk`` align bottom-right; padded keys
(``kv_mask``) write nothing but their decay still applies (a padded position is a position).

It runs as the recurrence ``S_t = gamma S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t scale`` over a
``[D, Dv]`` state per key/value head: chunkwise-parallel for training and prefill (RetNet's
"chunkwise recurrent" form), the quadratic ``(Q K^T * D) V`` "parallel" form for checking, one
step per token for decoding.

What belongs to the layer, not to this function: RetNet's xPos / rotary rotation of ``q`` and ``k``
(apply it to the inputs, with the absolute positions of the tokens, before the call), the per-head
group norm of the output, the swish output gate and the projections. RetNet's reference code also
rescales each output row (a decay-mask normalisation and a score normalisation); those are positive
per-row factors that the group norm divides out, so they are left to the layer as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..inputs import AttentionCall
from ..params import param
from ..registry import AttentionOutput, Capabilities, Method, Paper, register
from . import _recurrent as rec

DefaultDecay = Callable[[int], tuple[float, ...]]


def retnet_decays(heads: int) -> tuple[float, ...]:
    """RetNet's multi-scale decays ``1 - 2^(-5 - h)`` for heads ``h = 0 .. heads - 1``."""
    return tuple(1.0 - 2.0 ** (-5 - h) for h in range(heads))


def check_decay_param(decay: float | tuple[float, ...] | None) -> None:
    """Range checks that need no call: every value in (0, 1], a tuple not empty."""
    if decay is None:
        return
    if isinstance(decay, tuple) and not decay:
        raise ValueError("decay must be one float or one per key/value head, got an empty tuple")
    rec.check_decay(decay, len(decay) if isinstance(decay, tuple) else 1)


@dataclass(frozen=True)
class RetentionParams(rec.RecurrentParams):
    decay: float | tuple[float, ...] | None = param(
        None, "gamma in (0, 1]: one float, or one per key/value head; None: RetNet's 1 - 2^(-5-h)"
    )

    def validate(self) -> None:
        super().validate()
        check_decay_param(self.decay)


def decayed_builder(default: DefaultDecay) -> rec.Build:
    """``build`` of a constant-decay method: identity features, the scale on the queries and the
    decays ``p.decay`` (or ``default(Hkv)``) per key/value head."""

    def build(call: AttentionCall, p: RetentionParams, start: int) -> rec.Recurrence:
        decay = default(call.kv_heads) if p.decay is None else p.decay
        return rec.Recurrence(call.query * call.scale, call.key, log_decay=rec.constant_log_decay(decay, call))

    return build


def check_decay_heads(call: AttentionCall, p: RetentionParams) -> None:
    """A tuple of decays has one value per key/value head of the call (or a single value)."""
    if p.decay is not None:
        rec.check_decay(p.decay, call.kv_heads)


def _feature_dim(head_dim: int, p: RetentionParams) -> int:
    return head_dim


def _no_normalize(p: RetentionParams) -> bool:
    return False


build = decayed_builder(retnet_decays)
_recurrent_form = rec.form_runner(build, "recurrent")


def reference(call: AttentionCall, p: RetentionParams) -> AttentionOutput:
    """The recurrent form, token by token: ``S_t = gamma S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t scale``."""
    return _recurrent_form(call, p)


RETENTION = register(
    Method(
        name="retention",
        family="linear",
        exact=False,
        summary=(
            "RetNet's retention: o_i = sum_{j<=i} gamma_h^(i-j) (q_i . k_j) scale v_j, causal, unnormalised, one "
            "constant decay per key/value head (default RetNet's 1 - 2^(-5-h)); a recurrence over a D x Dv "
            "state run chunkwise (O(N C d + N d^2)) and decoded in O(1) per token. xPos/rotary and the group "
            "norm belong to the layer."
        ),
        paper=Paper(
            "Retentive Network: A Successor to Transformer for Large Language Models (Sun et al., 2023)",
            "https://arxiv.org/abs/2307.08621",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=False, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=RetentionParams,
        reference=reference,
        backends=rec.backends(build),
        test_params=(
            {},
            {"decay": 0.9, "chunk_size": 16},
            {"decay": (0.75,), "chunk_size": 5},
        ),
        decoder=rec.decoder(build, _feature_dim, _no_normalize),
        check=rec.make_check(_feature_dim, _no_normalize, check_decay_heads),
        notes=(
            "The recurrent form is the reference; `parallel` materialises (Q K^T * D) V. Identical to `gla` with "
            "the constant scalar gate log(gamma_h)."
        ),
    )
)

__all__ = ["RETENTION", "RetentionParams", "retnet_decays"]
