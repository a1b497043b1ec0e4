"""Block layouts: which key blocks each query block visits, and which of them need an element mask.

A :class:`BlockLayout` is the block-sparse engine's description of an attention pattern, close to
torch's ``BlockMask`` so that it converts both ways without loss:

* the queries are cut into blocks of ``block_size[0]`` positions and the keys into blocks of
  ``block_size[1]`` (the last block of each may be shorter);
* ``kv_indices [Gb, Gh, nQB, C]`` lists, for every query block, the key blocks it visits in
  increasing order (``kv_num_blocks [Gb, Gh, nQB]`` of them; the rest of the row is ``-1``);
  ``Gb`` is 1 (every batch element alike) or the batch size, ``Gh`` 1 or the number of query heads;
* ``full [Gb, Gh, nQB, C]`` says which visited blocks are entirely visible; the others are
  *partial*: inside them ``mask_mod(b, h, q_idx, kv_idx)`` (FlexAttention's signature, written with
  tensor operations so that it broadcasts) decides element by element.

Standard patterns build their layouts in closed form from per-row block lists
(:meth:`BlockLayout.from_block_lists`, O(N / block) memory); an arbitrary ``mask_mod`` is evaluated
block row by block row with bounded memory (:meth:`BlockLayout.from_mask_mod`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

_CONVERTED: list[tuple[Any, Any]] = []  # recent (BlockMask, BlockLayout) conversions

# Elements evaluated at once when a mask_mod is turned into a layout (bounded memory).
EVAL_ELEMENTS = 2**22


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def evaluate_mask_mod(mask_mod: MaskMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mask_mod`` on broadcastable index tensors, checked to give a bool tensor of their shape."""
    shape = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
    result = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(result, Tensor) or result.dtype != torch.bool:
        got = f"{type(result).__name__} {getattr(result, 'dtype', '')}"
        raise ValueError(f"mask_mod must return a bool tensor, got {got}")
    try:
        return result.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"mask_mod returned shape {list(result.shape)} for index tensors broadcasting to {list(shape)}; "
            "write it with element-wise tensor operations (as for FlexAttention)"
        ) from None


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Visited key blocks per query block (see the module docstring). Build it with a ``from_*``
    constructor; the fields are validated on construction."""

    q_len: int
    kv_len: int
    block_size: tuple[int, int]
    kv_indices: Tensor
    kv_num_blocks: Tensor
    full: Tensor
    mask_mod: MaskMod | None = None
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        bq, bk = self.block_size
        if bq < 1 or bk < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.q_len < 1 or self.kv_len < 1:
            raise ValueError(f"layout lengths must be positive, got q_len={self.q_len}, kv_len={self.kv_len}")
        n_qb = _blocks(self.q_len, bq)
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[2] != n_qb:
            raise ValueError(
                f"kv_indices must have shape [Gb, Gh, {n_qb}, C] ({n_qb} query blocks of {bq}), "
                f"got {list(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.shape != self.kv_indices.shape[:3] or self.full.shape != self.kv_indices.shape:
            raise ValueError(
                f"kv_num_blocks must have shape {list(self.kv_indices.shape[:3])} and full "
                f"{list(self.kv_indices.shape)}, got {list(self.kv_num_blocks.shape)} and {list(self.full.shape)}"
            )
        if self.mask_mod is None and bool(self.partial().any()):
            raise ValueError("mask_mod: the layout has partial blocks, so it needs a mask_mod for their elements")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_block_lists(
        cls,
        kv_indices: Tensor,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int],
        full: Tensor | bool = True,
        mask_mod: MaskMod | None = None,
    ) -> BlockLayout:
        """A layout from per-row lists of key blocks, ``kv_indices [..., nQB, C]`` (up to two
        leading group dims; ``-1`` pads a row). Rows are sorted and deduplicated (a block listed
        twice is full if either listing is); ``full`` is a bool tensor like ``kv_indices`` or one
        bool for every listed block."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        idx = kv_indices.long()
        while idx.dim() < 4:
            idx = idx[None]
        flags = full.reshape(idx.shape) if isinstance(full, Tensor) else torch.full(idx.shape, bool(full))
        flags = flags.to(idx.device)
        n_kb = _blocks(kv_len, bk)
        listed = idx >= 0
        if bool((idx[listed] >= n_kb).any()):
            raise ValueError(f"kv_indices: key block indices must be < {n_kb} (keys of {kv_len} in blocks of {bk})")
        big = n_kb + 1
        # sort by block, full listings first, so duplicates keep the "full" flag on their first copy
        key = torch.where(listed, idx * 2 + (~flags).long(), 2 * big)
        key, _ = key.sort(dim=-1)
        idx = torch.where(key < 2 * big, key // 2, -1)
        flags = (key % 2 == 0) & (idx >= 0)
        dup = torch.zeros_like(listed)
        dup[..., 1:] = (idx[..., 1:] == idx[..., :-1]) & (idx[..., 1:] >= 0)
        key = torch.where(dup | (idx < 0), 2 * big, idx * 2 + (~flags).long())
        key, _ = key.sort(dim=-1)
        count = (key < 2 * big).sum(-1)
        width = max(1, int(count.max()) if count.numel() else 1)
        key = key[..., :width]
        idx = torch.where(key < 2 * big, key // 2, -1)
        flags = (key % 2 == 0) & (idx >= 0)
        return cls(q_len, kv_len, (bq, bk), idx, count, flags, mask_mod)

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskMod,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int] = 128,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str = "cpu",
    ) -> BlockLayout:
        """Evaluate ``mask_mod`` block row by block row (at most :data:`EVAL_ELEMENTS` elements at
        once) and keep the blocks with a visible element. The group dims follow what the function
        reads: one that ignores ``b`` (or ``h``) gets ``Gb = 1`` (``Gh = 1``)."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if bq < 1 or bk < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        n_qb, n_kb = _blocks(q_len, bq), _blocks(kv_len, bk)
        b = torch.arange(batch, device=device)[:, None, None, None]
        h = torch.arange(heads, device=device)[None, :, None, None]
        kv = torch.arange(n_kb * bk, device=device)
        kv_ok = kv < kv_len
        kv_idx = kv.clamp(max=kv_len - 1)[None, None, None, :]
        rows = max(1, EVAL_ELEMENTS // max(1, batch * heads * n_kb * bk * bq))
        visited, full = [], []
        for r0 in range(0, n_qb, rows):
            r1 = min(n_qb, r0 + rows)
            q = torch.arange(r0 * bq, r1 * bq, device=device)
            q_ok = q < q_len
            q_idx = q.clamp(max=q_len - 1)[None, None, :, None]
            m = mask_mod(b, h, q_idx, kv_idx)
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"mask_mod must return a bool tensor, got {type(m).__name__}")
            while m.dim() < 4:
                m = m[None]
            target = (m.shape[0], m.shape[1], q.numel(), kv.numel())
            try:
                if m.dim() != 4 or m.shape[0] not in (1, batch) or m.shape[1] not in (1, heads):
                    raise RuntimeError
                m = m.expand(target)
            except RuntimeError:
                raise ValueError(
                    f"mask_mod returned shape {list(m.shape)} for index tensors of sizes "
                    f"{[batch, heads, *target[2:]]}; "
                    "write it with element-wise tensor operations (as for FlexAttention)"
                ) from None
            inside = q_ok[:, None] & kv_ok[None, :]
            shape = (m.shape[0], m.shape[1], r1 - r0, bq, n_kb, bk)
            visited.append((m & inside).reshape(shape).any(-1).any(-2))
            full.append((m | ~inside).reshape(shape).all(-1).all(-2))
        gb = max(v.shape[0] for v in visited)
        gh = max(v.shape[1] for v in visited)
        visited_t = torch.cat([v.expand(gb, gh, *v.shape[2:]) for v in visited], dim=2)
        full_t = torch.cat([f.expand(gb, gh, *f.shape[2:]) for f in full], dim=2) & visited_t
        return cls.from_dense_blocks(visited_t, full_t, q_len, kv_len, (bq, bk), mask_mod)

    @classmethod
    def from_dense_blocks(
        cls,
        visited: Tensor,
        full: Tensor,
        q_len: int,
        kv_len: int,
        block_size: tuple[int, int],
        mask_mod: MaskMod | None,
    ) -> BlockLayout:
        """A layout from bool block matrices ``visited``/``full [Gb, Gh, nQB, nKB]``."""
        n_kb = visited.shape[-1]
        cols = torch.arange(n_kb, device=visited.device).expand(visited.shape)
        idx = torch.where(visited, cols, -1)
        return cls.from_block_lists(idx, q_len, kv_len, block_size, full & visited, mask_mod)

    @classmethod
    def from_block_mask(cls, block_mask: Any) -> BlockLayout:
        """Convert torch's ``BlockMask`` (partial and full block lists, block sizes, ``mask_mod``).
        The last few conversions are cached, so passing the same ``BlockMask`` every step is cheap."""
        for held, layout in _CONVERTED:
            if held is block_mask:
                return layout
        layout = cls._convert_block_mask(block_mask)
        _CONVERTED.insert(0, (block_mask, layout))
        del _CONVERTED[8:]
        return layout

    @classmethod
    def _convert_block_mask(cls, block_mask: Any) -> BlockLayout:
        q_len, kv_len = block_mask.seq_lengths
        bq, bk = block_mask.BLOCK_SIZE
        parts, flags = [], []
        pairs = [(block_mask.kv_num_blocks, block_mask.kv_indices, False)]
        if block_mask.full_kv_num_blocks is not None:
            pairs.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True))
        n_qb = _blocks(q_len, bq)
        for num, ind, is_full in pairs:
            ind = ind[:, :, :n_qb].long()
            num = num[:, :, :n_qb].long()
            slot = torch.arange(ind.shape[-1], device=ind.device)
            parts.append(torch.where(slot < num[..., None], ind, -1))
            flags.append(torch.full(ind.shape, is_full, device=ind.device))
        gb = max(p.shape[0] for p in parts)
        gh = max(p.shape[1] for p in parts)
        idx = torch.cat([p.expand(gb, gh, *p.shape[2:]) for p in parts], dim=-1)
        flag = torch.cat([f.expand(gb, gh, *f.shape[2:]) for f in flags], dim=-1)
        return cls.from_block_lists(idx, q_len, kv_len, (bq, bk), flag, block_mask.mask_mod)

    # ----------------------------------------------------------------- queries
    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return _blocks(self.kv_len, self.block_size[1])

    @property
    def groups(self) -> tuple[int, int]:
        """``(Gb, Gh)``: 1 where every batch element (head) shares the layout."""
        return self.kv_indices.shape[0], self.kv_indices.shape[1]

    def listed(self) -> Tensor:
        """Bool ``[Gb, Gh, nQB, C]``: slots that hold a visited block."""
        slot = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        return slot < self.kv_num_blocks[..., None]

    def partial(self) -> Tensor:
        return self.listed() & ~self.full

    def density(self) -> float:
        """Fraction of the ``q_len x kv_len`` score matrix inside visited blocks (mean over groups)."""
        bq, bk = self.block_size
        q_rows = torch.full((self.num_q_blocks,), bq, device=self.kv_indices.device)
        q_rows[-1] = self.q_len - bq * (self.num_q_blocks - 1)
        k_cols = torch.full((self.num_kv_blocks,), bk, device=self.kv_indices.device)
        k_cols[-1] = self.kv_len - bk * (self.num_kv_blocks - 1)
        listed = self.listed()
        cols = torch.where(listed, k_cols[self.kv_indices.clamp(min=0)], 0).sum(-1)
        pairs = (cols * q_rows).sum() / (self.groups[0] * self.groups[1])
        return float(pairs) / (self.q_len * self.kv_len)

    def to_dense(self) -> Tensor:
        """Bool ``[Gb, Gh, q_len, kv_len]``: which query sees which key (small sizes only)."""
        bq, bk = self.block_size
        gb, gh = self.groups
        dev = self.kv_indices.device
        blocks = torch.zeros(gb, gh, self.num_q_blocks, self.num_kv_blocks + 1, dtype=torch.int8, device=dev)
        slot = torch.where(self.listed(), self.kv_indices, self.num_kv_blocks)
        value = torch.where(self.full, 2, 1).to(torch.int8)
        blocks.scatter_(-1, slot, value)
        blocks = blocks[..., :-1]
        q = torch.arange(self.q_len, device=dev)
        kv = torch.arange(self.kv_len, device=dev)
        per_elem = blocks[:, :, q // bq][:, :, :, kv // bk]
        visible = per_elem == 2
        if self.mask_mod is not None:
            b = torch.arange(gb, device=dev)[:, None, None, None]
            h = torch.arange(gh, device=dev)[None, :, None, None]
            m = evaluate_mask_mod(self.mask_mod, b, h, q[None, None, :, None], kv[None, None, None, :])
            visible = visible | ((per_elem == 1) & m)
        return visible

    def to_block_mask(self) -> Any:
        """The same pattern as torch's ``BlockMask`` (for ``flex_attention``)."""
        from torch.nn.attention.flex_attention import BlockMask, noop_mask

        listed = self.listed()
        width = self.num_kv_blocks
        out = []
        for keep in (listed & ~self.full, listed & self.full):
            key = torch.where(keep, self.kv_indices, width)
            key, _ = key.sort(dim=-1)
            num = keep.sum(-1).to(torch.int32)
            ind = torch.zeros(*key.shape[:3], width, dtype=torch.int32, device=key.device)
            n = min(width, key.shape[-1])
            ind[..., :n] = torch.where(key[..., :n] < width, key[..., :n], 0).to(torch.int32)
            out.append((num, ind))
        (num, ind), (full_num, full_ind) = out
        return BlockMask.from_kv_blocks(
            num,
            ind,
            full_num,
            full_ind,
            BLOCK_SIZE=self.block_size,
            mask_mod=self.mask_mod or noop_mask,
            seq_lengths=(self.q_len, self.kv_len),
        )

    # ----------------------------------------------------------------- transforms
    def causal(self, offset: int = 0) -> BlockLayout:
        """This layout intersected with ``kv_idx <= q_idx + offset`` (cached on the layout)."""
        key = ("causal", offset)
        if key not in self._plans:
            self._plans[key] = intersect_causal(self, offset)
        return self._plans[key]

    def expand_groups(self, gb: int, gh: int) -> BlockLayout:
        """The same layout with explicit group dims ``[gb, gh]`` (from 1 where it broadcast)."""
        if self.groups == (gb, gh):
            return self
        shape = (gb, gh, *self.kv_indices.shape[2:])
        return BlockLayout(
            self.q_len,
            self.kv_len,
            self.block_size,
            self.kv_indices.expand(shape).contiguous(),
            self.kv_num_blocks.expand(shape[:3]).contiguous(),
            self.full.expand(shape).contiguous(),
            self.mask_mod,
        )

    def check_call(self, batch: int, q_heads: int, q_len: int, kv_len: int, name: str = "layout") -> None:
        """Raise a ``ValueError`` naming ``name`` unless the layout fits these inputs."""
        if (self.q_len, self.kv_len) != (q_len, kv_len):
            raise ValueError(
                f"{name}: built for q_len={self.q_len}, kv_len={self.kv_len}, but the inputs have "
                f"Nq={q_len}, Nk={kv_len}"
            )
        gb, gh = self.groups
        if gb not in (1, batch) or gh not in (1, q_heads):
            raise ValueError(
                f"{name}: its group dims [{gb}, {gh}] must be 1 or the batch size ({batch}) and 1 or the "
                f"number of query heads ({q_heads})"
            )


def causal_mask_mod(offset: int) -> MaskMod:
    """``kv_idx <= q_idx + offset`` (bottom-right aligned causality)."""

    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    causal.relative = True  # a function of q_idx - kv_idx alone: the kernel evaluates it once per offset
    return causal


def and_mask_mods(*mods: MaskMod | None) -> MaskMod | None:
    """The conjunction of the given rules (``None`` entries ignored)."""
    present = [m for m in mods if m is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def both(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = present[0](b, h, q_idx, kv_idx)
        for m in present[1:]:
            result = result & m(b, h, q_idx, kv_idx)
        return result

    both.relative = all(getattr(m, "relative", False) for m in present)
    return both


def intersect_causal(layout: BlockLayout, offset: int) -> BlockLayout:
    """``layout`` restricted to ``kv_idx <= q_idx + offset``: future blocks dropped, blocks crossing
    the diagonal made partial, the causal rule and-ed into ``mask_mod``."""
    bq, bk = layout.block_size
    dev = layout.kv_indices.device
    qb = torch.arange(layout.num_q_blocks, device=dev)[None, None, :, None]
    first_q = qb * bq
    last_q = torch.clamp((qb + 1) * bq, max=layout.q_len) - 1
    first_k = layout.kv_indices * bk
    last_k = torch.clamp((layout.kv_indices + 1) * bk, max=layout.kv_len) - 1
    listed = layout.listed()
    keep = listed & (first_k <= last_q + offset)
    below = last_k <= first_q + offset  # every element of the block is visible causally
    idx = torch.where(keep, layout.kv_indices, -1)
    full = layout.full & below
    rule = and_mask_mods(layout.mask_mod, causal_mask_mod(offset))
    return BlockLayout.from_block_lists(idx, layout.q_len, layout.kv_len, layout.block_size, full, rule)
