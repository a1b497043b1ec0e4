"""``block_sparse``: attention restricted to a block layout or a FlexAttention-style ``mask_mod``.

Pass ``layout=`` (an :class:`attnzoo.BlockLayout`, or torch's ``BlockMask``, converted) or
``mask_mod=`` (``mask_mod(b, h, q_idx, kv_idx) -> bool``, FlexAttention's signature, evaluated
block by block into a layout of ``block_size`` blocks and cached). ``is_causal=True`` intersects
the pattern with bottom-right aligned causality. The helpers here (:func:`run_layout`,
:func:`reference_layout`) are shared by every method of the block-sparse families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout, evaluate_mask_mod
from ..kernels.blocksparse import block_attention
from ..kernels.reference import softmax_reference
from ..kernels.tiles import cached_layout
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder


def run_layout(call: AttentionCall, layout: BlockLayout) -> AttentionOutput:
    """The block-sparse kernel on ``call`` (sequence layout ``[B, H, N, D]``)."""
    out, lse = block_attention(call.query, call.key, call.value, layout, call.scale, call.kv_mask)
    return AttentionOutput(out, lse if call.return_lse else None)


def reference_layout(call: AttentionCall, visible: Tensor) -> AttentionOutput:
    """Dense softmax under ``visible [B or 1, H or 1, Nq, Nk]`` and the padding mask."""
    if call.kv_mask is not None:
        visible = visible & call.kv_mask[:, None, None, :]
    out, lse = softmax_reference(call, visible)
    return AttentionOutput(out, lse if call.return_lse else None)


def causal_visibility(call: AttentionCall) -> Tensor:
    """Bool ``[Nq, Nk]``: bottom-right aligned causality."""
    i = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
    return torch.arange(call.kv_len, device=call.device)[None, :] <= i


def _is_block_mask(value: Any) -> bool:
    return type(value).__name__ == "BlockMask" and hasattr(value, "kv_indices")


@dataclass(frozen=True)
class BlockSparseParams(MethodParams):
    layout: Any = param(None, "a BlockLayout (or torch BlockMask) built for these input sizes")  # noqa: RUF009
    mask_mod: Any = param(None, "mask_mod(b, h, q_idx, kv_idx) -> bool, FlexAttention's signature")  # noqa: RUF009
    block_size: int = param(128, "block size when the layout is built from mask_mod")

    def validate(self) -> None:
        if self.layout is not None and not (isinstance(self.layout, BlockLayout) or _is_block_mask(self.layout)):
            got = type(self.layout).__name__
            raise TypeError(f"layout must be an attnzoo.BlockLayout or a torch BlockMask, got {got}")
        if self.mask_mod is not None and not callable(self.mask_mod):
            raise TypeError(f"mask_mod must be callable, got {type(self.mask_mod).__name__}")
        if self.layout is not None and self.mask_mod is not None:
            raise ValueError("block_sparse takes layout= or mask_mod=, not both")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def _base_layout(call: AttentionCall, p: BlockSparseParams) -> BlockLayout:
    if p.layout is not None:
        return p.layout if isinstance(p.layout, BlockLayout) else BlockLayout.from_block_mask(p.layout)
    sizes = (call.q_len, call.kv_len, call.batch, call.q_heads, str(call.device))
    key = ("block_sparse", p.mask_mod, p.block_size, *sizes)
    return cached_layout(
        key,
        lambda: BlockLayout.from_mask_mod(
            p.mask_mod, call.q_len, call.kv_len, p.block_size, call.batch, call.q_heads, call.device
        ),
    )


def layout_for(call: AttentionCall, p: BlockSparseParams) -> BlockLayout:
    """The layout this call runs: the given one (checked), or built from ``mask_mod``; with
    ``is_causal`` intersected with causality (cached)."""
    layout = _base_layout(call, p)
    return layout.causal(call.causal_offset) if call.is_causal else layout


def check(call: AttentionCall, p: BlockSparseParams) -> None:
    if p.layout is None and p.mask_mod is None:
        raise ValueError("layout: block_sparse needs layout= (a BlockLayout or BlockMask) or mask_mod=")
    if p.layout is not None:
        layout = p.layout if isinstance(p.layout, BlockLayout) else BlockLayout.from_block_mask(p.layout)
        layout.check_call(call.batch, call.q_heads, call.q_len, call.kv_len)


def reference(call: AttentionCall, p: BlockSparseParams) -> AttentionOutput:
    """Dense softmax where ``mask_mod`` (evaluated on every pair) or the layout allows."""
    if p.mask_mod is not None:
        b = torch.arange(call.batch, device=call.device)[:, None, None, None]
        h = torch.arange(call.q_heads, device=call.device)[None, :, None, None]
        q = torch.arange(call.q_len, device=call.device)[None, None, :, None]
        kv = torch.arange(call.kv_len, device=call.device)[None, None, None, :]
        visible = evaluate_mask_mod(p.mask_mod, b, h, q, kv)
    else:
        layout = p.layout if isinstance(p.layout, BlockLayout) else BlockLayout.from_block_mask(p.layout)
        visible = layout.to_dense()
    if call.is_causal:
        visible = visible & causal_visibility(call)
    return reference_layout(call, visible)


def _run(call: AttentionCall, p: BlockSparseParams) -> AttentionOutput:
    return run_layout(call, layout_for(call, p))


def _document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Packed documents of 13 tokens, each attending itself (a test pattern)."""
    return (q_idx // 13) == (kv_idx // 13)


def _dilated_band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A band of +-9 keys on offsets of one parity per head, plus the diagonal (a test pattern)."""
    d = q_idx - kv_idx + h
    return ((d.abs() <= 9) & (d % 2 == 0)) | (q_idx == kv_idx)


def _everything(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= 0


def _degenerate(call: AttentionCall) -> dict:
    return {"mask_mod": _everything, "block_size": 16}


def _band(keys: int, is_causal: bool):
    """A ``mask_mod`` where each query sees ``keys`` consecutive keys: the latest ones (causal) or
    those centred on it."""
    before = keys - 1 if is_causal else keys // 2
    after = 0 if is_causal else keys - 1 - before

    def band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx - kv_idx <= before) & (kv_idx - q_idx <= after)

    return band


def _budget(call: AttentionCall, keys: int) -> dict[str, Any]:
    """A band of ``keys`` keys per query in blocks of 64, a stand-in layout for timing the engine
    (every key once ``keys`` covers them)."""
    if keys >= call.kv_len:
        return _degenerate(call)
    return {"mask_mod": _band(keys, call.is_causal), "block_size": 64}


def _decode_min_len(p: BlockSparseParams) -> int:
    """Decode by recomputation (``mask_mod`` sees absolute positions). A fixed ``layout`` is
    built for one sequence length: the cache is padded to it (causal: the padding is invisible)."""
    if p.layout is None:
        return 1
    layout = p.layout if isinstance(p.layout, BlockLayout) else BlockLayout.from_block_mask(p.layout)
    return layout.q_len


BLOCK_SPARSE = register(
    Method(
        name="block_sparse",
        family="block_sparse",
        exact=False,
        summary=(
            "Attention restricted to a block layout: for each query block, the key blocks it visits, full or "
            "with an element mask. Takes an attnzoo.BlockLayout, a torch BlockMask or a FlexAttention mask_mod; "
            "the gather-and-flash kernel's time is proportional to the visited blocks."
        ),
        paper=Paper(
            "Generating Long Sequences with Sparse Transformers (Child et al., 2019)",
            "https://arxiv.org/abs/1904.10509",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, lse=True, decode=True
        ),
        params=BlockSparseParams,
        decoder=cached_decoder("block_sparse", min_len=_decode_min_len),
        reference=reference,
        backends=(Backend("blocks", _run, description="gathered key blocks per query block (flash kernel on CPU)"),),
        test_params=(
            {"mask_mod": _document_mask, "block_size": 16},
            {"mask_mod": _dilated_band, "block_size": 8},
        ),
        degenerate_params=_degenerate,
        budget=_budget,
        notes="FlexAttention (Dong et al., 2024) defines the mask_mod and BlockMask conventions followed here.",
        check=check,
    )
)

__all__ = ["BLOCK_SPARSE", "BlockSparseParams", "causal_visibility", "layout_for", "reference_layout", "run_layout"]
