"""``transnormer``: TransNormer's two token mixers (Qin et al., 2022, "The Devil in Linear Transformer").

The paper uses DiagAttention in the early layers and NormAttention in the later ones; the layer
picks one with ``part``.

``part="norm"`` (NormAttention): linear attention without the denominator, followed by a
normalisation of each output row: ``o_i = Norm(sum_{j visible} (phi(q_i) . phi(k_j)) scale v_j)``
with ``j <= i`` causal (bottom-right aligned for ``Nq != Nk``) or every key non-causal. ``phi`` is
``elu(x) + 1`` by default (TransNormer's ``1+elu``; ``feature_map`` picks another shared map).
``norm`` is the paper's choice ``"rmsnorm"`` (``x / sqrt(mean(x^2) + eps)`` over the value dim of
the head, no learned gain: TransNormer's SimpleRMSNorm), ``"layernorm"`` (``(x - mean) /
sqrt(var + eps)``, no affine) or ``"none"`` (the layer normalises, e.g. over the concatenated heads
as TransNormer's code does). The scale multiplies the query features; a norm divides it out (up to
``eps``). A row with no visible key is 0 (its norm stays 0). The norm acts on each row alone, so
causal calls do not leak. It runs on the shared recurrence (chunkwise, parallel, recurrent forms;
O(1) decoding); ``return_state`` gives the un-normalised :class:`~attnzoo.kernels.linear_state.LinearState`.

``part="diag"`` (DiagAttention): softmax attention (scale ``scale``) inside non-overlapping blocks
of ``block_size`` positions: query ``i`` sits at key position ``p_i = i + Nk - Nq`` (the library's
bottom-right alignment, in both modes) and sees the keys ``j`` with ``j // block_size == p_i //
block_size`` (and ``j <= p_i`` when causal). Queries without such a key (``p_i < 0``, or padding)
give 0 rows. It runs on the block-sparse engine (each query block visits its own key block, or the
two it straddles when ``Nk - Nq`` is not a multiple of ``block_size``); ``parallel`` and the
reference materialise the scores. Its state (decoding, ``return_state``, ``initial_state``) is a
:class:`DiagState`: the keys and values of the current, unfinished block, emptied at every block
boundary. Parameters of the other part are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout, MaskMod
from ..kernels.features import feature_map
from ..kernels.linear_state import LinearState, check_state, compute_dtype, empty_state
from ..kernels.tiles import cached_layout
from ..params import param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from . import _recurrent as rec
from .block_sparse import reference_layout, run_layout


@dataclass(frozen=True, eq=False)
class DiagState:
    """DiagAttention's state: ``key [B, Hkv, n, D]``, ``value [B, Hkv, n, Dv]`` and ``mask [B, n]``
    (``None``: all real) of the ``n = length % block_size`` keys of the current block, and
    ``length``, the number of positions seen."""

    key: Tensor
    value: Tensor
    mask: Tensor | None = None
    length: int = 0

    def size_bytes(self) -> int:
        tensors = [self.key, self.value] + ([] if self.mask is None else [self.mask])
        return sum(t.numel() * t.element_size() for t in tensors)

    def detach(self) -> DiagState:
        return replace(self, key=self.key.detach(), value=self.value.detach())


@dataclass(frozen=True)
class TransNormerParams(rec.RecurrentParams):
    part: Literal["norm", "diag"] = param("norm", "NormAttention (later layers) or DiagAttention (early layers)")
    feature_map: Literal["elu", "relu", "identity", "softmax"] = param(
        "elu", "norm: phi of queries and keys (elu: 1 + elu, the paper's)"
    )
    norm: Literal["rmsnorm", "layernorm", "none"] = param(
        "rmsnorm", "norm: the output normalisation over the value dim, no affine (rmsnorm: the paper's)"
    )
    eps: float = param(1e-6, "norm: added to the mean square (variance) in the output norm")
    block_size: int = param(64, "diag: positions per block of the block-diagonal softmax attention")
    initial_state: LinearState | DiagState | None = param(  # noqa: RUF009
        None, "the state before the first token (from return_state=True): LinearState (norm) or DiagState (diag)"
    )

    def validate(self) -> None:
        super().validate()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {self.eps}")


# -- norm part ----------------------------------------------------------------------------------


def build(call: AttentionCall, p: TransNormerParams, start: int) -> rec.Recurrence:
    q = feature_map(p.feature_map, call.query) * call.scale
    return rec.Recurrence(q, feature_map(p.feature_map, call.key))


def output_norm(out: Tensor, p: TransNormerParams) -> Tensor:
    """NormAttention's row normalisation over the last dim (float32, or float64, inside)."""
    if p.norm == "none":
        return out
    x = out.to(compute_dtype(out.dtype))
    if p.norm == "layernorm":
        x = x - x.mean(dim=-1, keepdim=True)
    return (x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + p.eps)).to(out.dtype)


def _norm_part(call: AttentionCall, p: TransNormerParams, form: str, state: LinearState | None):
    start = 0 if state is None else state.length
    out, final = rec.run(call, p, build(call, p, start), form, state)
    return output_norm(out, p), final


# -- diag part ----------------------------------------------------------------------------------


def _floor_div(x: Tensor, n: int) -> Tensor:
    return torch.div(x, n, rounding_mode="floor")


def _same_block(offset: int, block: int) -> MaskMod:
    def same_block(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _floor_div(q_idx + offset, block) == _floor_div(kv_idx, block)

    return same_block


def _build_layout(q_len: int, kv_len: int, block: int, causal: bool, device: torch.device) -> BlockLayout:
    """Query block ``r`` (queries ``r * block ...``, at positions shifted by ``Nk - Nq``) visits the
    key blocks of its first and last positions: one, full, when the shift is a multiple of the
    block; else two, partial, under the same-block rule."""
    offset = kv_len - q_len
    r = torch.arange(-(-q_len // block), device=device)
    first = _floor_div(r * block + offset, block)
    last = _floor_div(torch.clamp((r + 1) * block, max=q_len) - 1 + offset, block)
    idx = torch.stack([first, last], dim=-1)
    idx = torch.where((idx >= 0) & (idx < -(-kv_len // block)), idx, -1)
    aligned = offset % block == 0
    mask_mod = None if aligned else _same_block(offset, block)
    layout = BlockLayout.from_block_lists(idx, q_len, kv_len, block, full=aligned, mask_mod=mask_mod)
    return layout.causal(offset) if causal else layout


def diag_layout(call: AttentionCall, block: int) -> BlockLayout:
    """The block-diagonal layout of a call (cached per sizes, block, causality and device)."""
    key = ("transnormer-diag", call.q_len, call.kv_len, block, call.is_causal, str(call.device))
    return cached_layout(key, lambda: _build_layout(call.q_len, call.kv_len, block, call.is_causal, call.device))


def diag_visible(call: AttentionCall, block: int) -> Tensor:
    """Bool ``[1, 1, Nq, Nk]``: same block (and causal), from positions."""
    pos = torch.arange(call.q_len, device=call.device)[:, None] + call.kv_len - call.q_len
    kv = torch.arange(call.kv_len, device=call.device)[None, :]
    visible = _floor_div(pos, block) == _floor_div(kv, block)
    if call.is_causal:
        visible = visible & (kv <= pos)
    return visible[None, None]


def _with_state(call: AttentionCall, state: DiagState | None) -> AttentionCall:
    """The call with the state's keys (the current block's, before the call's) in front."""
    if state is None or state.key.shape[2] == 0:
        return call
    n = state.key.shape[2]
    masks = None
    if state.mask is not None or call.kv_mask is not None:
        old = state.mask if state.mask is not None else torch.ones(call.batch, n, dtype=torch.bool, device=call.device)
        new = call.kv_mask if call.kv_mask is not None else torch.ones_like(call.key[:, 0, :, 0], dtype=torch.bool)
        masks = torch.cat([old, new], dim=1)
    key = torch.cat([state.key.to(call.dtype), call.key], dim=2)
    value = torch.cat([state.value.to(call.dtype), call.value], dim=2)
    return call.replace(key=key, value=value, kv_mask=masks, kv_len=call.kv_len + n)


def _diag_part(call: AttentionCall, p: TransNormerParams, dense: bool, state: DiagState | None):
    length = (0 if state is None else state.length) + call.kv_len
    call = _with_state(call, state)
    if dense:
        out = reference_layout(call.replace(return_lse=False), diag_visible(call, p.block_size)).out
    else:
        out = run_layout(call.replace(return_lse=False), diag_layout(call, p.block_size)).out
    keep = call.kv_len - length % p.block_size
    mask = None if call.kv_mask is None else call.kv_mask[:, keep:]
    return out, DiagState(call.key[:, :, keep:], call.value[:, :, keep:], mask, length)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_diag_state(state: object, batch, kv_heads, head_dim, value_dim, dtype, device, block: int) -> DiagState:
    if not isinstance(state, DiagState):
        raise TypeError(f"initial_state of part='diag' must be a DiagState (from return_state=True), got {type(state)}")
    n = state.key.shape[2] if state.key.dim() == 4 else -1
    shapes = [list(state.key.shape), list(state.value.shape)]
    if shapes != [[batch, kv_heads, n, head_dim], [batch, kv_heads, n, value_dim]]:
        raise ValueError(
            f"initial_state.key/value must have shapes [B, Hkv, n, D] / [B, Hkv, n, Dv] with B={batch}, "
            f"Hkv={kv_heads}, D={head_dim}, Dv={value_dim}; got {shapes[0]} and {shapes[1]}"
        )
    if state.key.dtype != dtype or state.value.dtype != dtype or not _same_device(state.key.device, device):
        raise ValueError(f"initial_state must hold {dtype} tensors on {device}, got {state.key.dtype}")
    if isinstance(state.length, bool) or not isinstance(state.length, int) or state.length % block != n:
        raise ValueError(
            f"initial_state holds {n} keys but its length {state.length!r} in blocks of block_size={block} "
            f"needs length % block_size of them"
        )
    if state.mask is not None and (state.mask.dtype != torch.bool or list(state.mask.shape) != [batch, n]):
        raise ValueError(f"initial_state.mask must be bool [B, n] = {[batch, n]}")
    return state


def _check_state(state: object, batch, kv_heads, head_dim, value_dim, dtype, device, p: TransNormerParams):
    """The initial state of the part: a LinearState (norm) or a DiagState (diag) of these sizes."""
    if p.part == "diag":
        return _check_diag_state(state, batch, kv_heads, head_dim, value_dim, dtype, device, p.block_size)
    return check_state(state, batch, kv_heads, head_dim, value_dim, False, dtype)


# -- the method -----------------------------------------------------------------------------------


def check(call: AttentionCall, p: TransNormerParams) -> None:
    if p.initial_state is not None:
        dims = (call.batch, call.kv_heads, call.head_dim, call.value_dim, call.dtype, call.device)
        _check_state(p.initial_state, *dims, p)


def _runner(form: str, dense: bool):
    def runner(call: AttentionCall, p: TransNormerParams) -> AttentionOutput:
        if p.part == "diag":
            out, state = _diag_part(call, p, dense, p.initial_state)
        else:
            out, state = _norm_part(call, p, form, p.initial_state)
        return AttentionOutput(out, None, state if call.return_state else None)

    return runner


_reference = _runner("recurrent", dense=True)


def reference(call: AttentionCall, p: TransNormerParams) -> AttentionOutput:
    """norm: the recurrent form token by token, then the row norm; diag: dense softmax under the
    block-diagonal (and causal) mask, every score materialised."""
    return _reference(call, p)


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: TransNormerParams):
    if p.initial_state is not None:  # continue after a prefill (``return_state=True``)
        return _check_state(p.initial_state, batch, kv_heads, head_dim, value_dim, dtype, device, p)
    if p.part == "norm":
        return empty_state(batch, kv_heads, head_dim, value_dim, False, dtype, device)
    empty = lambda d: torch.zeros(batch, kv_heads, 0, d, dtype=dtype, device=device)  # noqa: E731
    return DiagState(empty(head_dim), empty(value_dim), None, 0)


def _step(call: AttentionCall, state: LinearState | DiagState, p: TransNormerParams):
    if isinstance(state, DiagState) != (p.part == "diag"):
        raise ValueError(f"part: the decoding state was made for the other part, got part={p.part!r}")
    if p.part == "diag":
        out, new = _diag_part(call, p, False, state)
    else:
        out, new = _norm_part(call, p, "chunk", state)
    return AttentionOutput(out), new


TRANSNORMER = register(
    Method(
        name="transnormer",
        family="linear",
        exact=False,
        summary=(
            "TransNormer's token mixers: part='norm' is NormAttention, Norm(phi(q) sum phi(k) v^T) (1+elu features, "
            "no denominator, RMSNorm of each output row; chunkwise, O(1) decoding); part='diag' is DiagAttention, "
            "softmax attention inside non-overlapping blocks of block_size positions (block-sparse engine, "
            "O(N block d))."
        ),
        paper=Paper("The Devil in Linear Transformer (Qin et al., 2022)", "https://arxiv.org/abs/2210.10340"),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=TransNormerParams,
        reference=reference,
        backends=(
            Backend(
                "chunk",
                _runner("chunk", dense=False),
                description="norm: chunkwise-parallel; diag: block-sparse kernel",
            ),
            Backend(
                "parallel", _runner("parallel", dense=True), description="scores materialised, quadratic (checking)"
            ),
        ),
        test_params=(
            {},
            {"part": "diag", "block_size": 16},
            {"feature_map": "relu", "norm": "layernorm", "chunk_size": 5},
            {"part": "diag", "block_size": 5},
        ),
        decoder=Decoder(_init_state, _step),
        check=check,
        notes=(
            "The layer picks the part (the paper: diag in the first half of the layers, norm in the rest). "
            "TransNormer's output gate, projections and the norm over concatenated heads belong to the layer "
            "(norm='none' leaves the normalisation to it)."
        ),
    )
)

__all__ = ["TRANSNORMER", "DiagState", "TransNormerParams", "diag_layout", "diag_visible", "output_norm"]
