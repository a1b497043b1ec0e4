"""The block-sparse kernel: attention restricted to a :class:`~.blocklayout.BlockLayout`.

Every query block is a *tile*: ``block_size[0]`` query rows of each head that shares its layout
row, attending the concatenation of the key blocks it visits. Tiles are sorted by how many blocks
they visit, so that a chunk of tiles is one dense problem ``[n, heads, Bq, c * Bk]``; its queries,
keys and values are gathered whole blocks at a time (``index_select`` of block rows into reused
buffers) and run through the fused CPU flash kernel SDPA uses, with no mask at all when every
block of the chunk is full, or with an additive bias holding the element masks of the partial
blocks (``mask_mod`` evaluated once per layout and input shape, then cached). Off the CPU (or
with ``Dv != D``) the same chunks run through ``matmul``/``softmax``.

Time is proportional to the visited blocks; memory is O(N) plus one chunk's workspace. The
backward recomputes each chunk from the saved output and log-sum-exp (FlashAttention-2 style),
writes query gradients block by block and accumulates key and value gradients with
``index_add_`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .blocklayout import EVAL_ELEMENTS, BlockLayout, evaluate_mask_mod
from .reference import lse_dtype
from .tiles import (
    CHUNK_BYTES,
    _flash,
    _flash_chunk_backward,
    _math_attend,
    _math_chunk_backward,
    _use_flash,
    recomputed_attention,
)


@dataclass(frozen=True)
class _Run:
    """Tiles visiting ``count`` blocks each: block rows of their queries ``[n, Hg]`` and keys
    ``[n, Hgk * count]``, the batch element of each tile (``[n]``, for padding masks) and the
    partial slots ``(tile, slot, mask row)`` or ``None`` when every block is full. ``shared`` is
    True when every tile of the run has the same partial slots with the same masks (a causal
    diagonal, say): one bias then serves the whole run."""

    count: int
    q_rows: Tensor
    k_rows: Tensor
    batch: Tensor | None
    partial: tuple[Tensor, Tensor, Tensor] | None
    shared: bool = False


@dataclass(frozen=True)
class _Plan:
    runs: tuple[_Run, ...]
    masks: Tensor  # bool [P, Bq, Bk]: element masks of the partial slots
    heads: tuple[int, int]  # (Hg, Hgk): heads per tile in the kernel call
    covered: bool  # every query block visits at least one key block
    biases: dict = field(default_factory=dict)  # (run index, dtype) -> shared bias of a run


def _member_heads(gb: int, gh: int, batch: int, q_heads: int, kv_heads: int, device) -> tuple[Tensor, Tensor]:
    """Flat query heads ``[G, Hg]`` and key/value heads ``[G, Hgk]`` of every layout group."""
    groups = q_heads // kv_heads
    q_rows, kv_rows = [], []
    for g_b in range(gb):
        bs = [g_b] if gb == batch else list(range(batch))
        for g_h in range(gh):
            if gh == q_heads:
                q_rows.append([b * q_heads + g_h for b in bs])
                kv_rows.append([b * kv_heads + g_h // groups for b in bs])
            else:
                q_rows.append([b * q_heads + h for b in bs for h in range(q_heads)])
                kv_rows.append([b * kv_heads + h for b in bs for h in range(kv_heads)])
    return torch.tensor(q_rows, device=device), torch.tensor(kv_rows, device=device)


def _partial_masks(layout: BlockLayout, g_of: Tensor, qb: Tensor, kb: Tensor, is_partial: Tensor):
    """Element masks of the given slots as ``(table [U, Bq, Bk] bool, row of each slot [P])``:
    ``mask_mod`` where the layout marks the block partial, keys past ``kv_len`` hidden, padded query
    rows seeing every real key. A rule marked ``relative`` (a function of ``q_idx - kv_idx`` only,
    like causality) is evaluated once per distinct offset of the interior blocks."""
    bq, bk = layout.block_size
    dev = qb.device
    rows = torch.arange(qb.numel(), device=dev)
    interior = ((qb + 1) * bq <= layout.q_len) & ((kb + 1) * bk <= layout.kv_len) & is_partial
    if getattr(layout.mask_mod, "relative", False) and bool(interior.any()):
        offsets, inverse = torch.unique(qb[interior] * bq - kb[interior] * bk, return_inverse=True)
        first = torch.full((offsets.numel(),), qb.numel(), device=dev).scatter_reduce_(
            0, inverse, rows[interior], "amin"
        )
        rest = ~interior
        rest[first] = True  # one representative slot per offset is evaluated
        table, found = _evaluate(layout, g_of[rest], qb[rest], kb[rest], is_partial[rest])
        where = torch.full((qb.numel(),), -1, dtype=torch.long, device=dev)
        where[rest] = found
        where[interior] = where[first][inverse]
        return table, where
    return _evaluate(layout, g_of, qb, kb, is_partial)


def _evaluate(layout: BlockLayout, g_of: Tensor, qb: Tensor, kb: Tensor, is_partial: Tensor):
    bq, bk = layout.block_size
    gh = layout.groups[1]
    dev = qb.device
    out = torch.empty(qb.numel(), bq, bk, dtype=torch.bool, device=dev)
    step = max(1, EVAL_ELEMENTS // (bq * bk))
    for a in range(0, qb.numel(), step):
        sl = slice(a, a + step)
        q = qb[sl, None, None] * bq + torch.arange(bq, device=dev)[None, :, None]
        kv = kb[sl, None, None] * bk + torch.arange(bk, device=dev)[None, None, :]
        kv_ok = kv < layout.kv_len
        m = kv_ok.expand(-1, bq, -1).clone()
        use = is_partial[sl]
        if layout.mask_mod is not None and bool(use.any()):
            g = g_of[sl]
            b, h = (g // gh)[:, None, None], (g % gh)[:, None, None]
            rule = evaluate_mask_mod(
                layout.mask_mod, b, h, q.clamp(max=layout.q_len - 1), kv.clamp(max=layout.kv_len - 1)
            )
            m = torch.where(use[:, None, None] & (q < layout.q_len), rule & kv_ok, m)
        out[sl] = m
    return out, torch.arange(qb.numel(), device=dev)


def _build_plan(layout: BlockLayout, batch: int, q_heads: int, kv_heads: int, padded: bool, device) -> _Plan:
    gb, gh = layout.groups
    if padded and gb == 1 and batch > 1:  # padding differs per batch element: one tile per element
        layout = layout.expand_groups(batch, gh)
        gb = batch
    q_heads_of, kv_heads_of = _member_heads(gb, gh, batch, q_heads, kv_heads, device)
    n_qb, n_kb = layout.num_q_blocks, layout.num_kv_blocks
    idx = layout.kv_indices.to(device).reshape(gb * gh * n_qb, -1)
    count = layout.kv_num_blocks.to(device).reshape(-1)
    slot = torch.arange(idx.shape[1], device=device)
    listed = slot < count[:, None]
    ruled = listed & ~layout.full.to(device).reshape(idx.shape)  # the layout's partial blocks
    partial = ruled | (listed & (idx == n_kb - 1)) if layout.kv_len % layout.block_size[1] else ruled
    has_partial = partial.any(-1)
    order = torch.argsort(count * 2 + has_partial.long(), stable=True)
    tiles = torch.arange(idx.shape[0], device=device)
    g_all, qb_all = tiles // n_qb, tiles % n_qb
    runs, mask_parts, n_masks = [], [], 0
    keys = (count * 2 + has_partial.long())[order]
    bounds = torch.cumsum(torch.unique_consecutive(keys, return_counts=True)[1], 0).tolist()
    start = 0
    for end in bounds:
        t = order[start:end]
        start = end
        c = int(count[t[0]])
        if c == 0:
            continue
        g, qb = g_all[t], qb_all[t]
        q_rows = q_heads_of[g] * n_qb + qb[:, None]
        kb = idx[t, :c]
        k_rows = (kv_heads_of[g][:, :, None] * n_kb + kb[:, None, :]).reshape(len(t), -1)
        run_partial, shared = None, False
        if bool(has_partial[t[0]]) or padded:
            ti, sj = torch.nonzero(partial[t, :c], as_tuple=True)
            if ti.numel():
                table, rows = _partial_masks(layout, g[ti], qb[ti], kb[ti, sj], ruled[t, :c][ti, sj])
                mask_parts.append(table)
                rows = rows + n_masks
                n_masks += table.shape[0]
                run_partial = (ti, sj, rows)
                per_tile = ti.numel() // len(t)
                shared = per_tile * len(t) == ti.numel() and bool(
                    (sj.view(len(t), per_tile) == sj[:per_tile]).all()
                    and (rows.view(len(t), per_tile) == rows[:per_tile]).all()
                )
        batch_of = g // gh if gb == batch else None
        runs.append(_Run(c, q_rows, k_rows, batch_of, run_partial, run_partial is not None and shared))
    bq, bk = layout.block_size
    masks = torch.cat(mask_parts) if mask_parts else torch.zeros(0, bq, bk, dtype=torch.bool, device=device)
    return _Plan(tuple(runs), masks, (q_heads_of.shape[1], kv_heads_of.shape[1]), bool((count > 0).all()))


def plan_for(layout: BlockLayout, batch: int, q_heads: int, kv_heads: int, padded: bool, device) -> _Plan:
    """The cached execution plan of ``layout`` for these input sizes."""
    key = (batch, q_heads, kv_heads, padded, str(device))
    plan = layout._plans.get(key)
    if plan is None:
        plan = _build_plan(layout, batch, q_heads, kv_heads, padded, device)
        layout._plans[key] = plan
    return plan


class _Buffers:
    """Gather targets reused across the chunks of a call (fresh allocations page-fault)."""

    def __init__(self) -> None:
        self._store: dict[str, Tensor] = {}

    def take(self, name: str, src: Tensor, rows: Tensor) -> Tensor:
        numel = rows.numel() * src.shape[1]
        buf = self._store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != src.dtype:
            buf = src.new_empty(numel)
            self._store[name] = buf
        return torch.index_select(src, 0, rows, out=buf[:numel].view(rows.numel(), src.shape[1]))


class _Problem:
    """The block views of one call: ``[rows, block * E]`` for q, k, v, outputs and gradients."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, kv_mask: Tensor | None) -> None:
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.bq, self.bk = layout.block_size
        self.n_qb, self.n_kb = layout.num_q_blocks, layout.num_kv_blocks
        self.shape = (B, Hq, Hkv, Nq, Nk, D, Dv)
        self.pad_q, self.pad_k = self.n_qb * self.bq - Nq, self.n_kb * self.bk - Nk
        self.q = self._blocks(q, self.pad_q, self.bq)
        self.k = self._blocks(k, self.pad_k, self.bk)
        self.v = self._blocks(v, self.pad_k, self.bk)
        self.key_ok = None
        if kv_mask is not None:
            ok = torch.nn.functional.pad(kv_mask, (0, self.pad_k)) if self.pad_k else kv_mask
            self.key_ok = ok.reshape(B * self.n_kb, self.bk)

    @staticmethod
    def _blocks(x: Tensor, pad: int, size: int) -> Tensor:
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(-1, size * x.shape[-1])

    def q_like(self, x: Tensor) -> Tensor:
        """``[B, Hq, Nq, E]`` (or ``[B, Hq, Nq]``) as query block rows ``[B * Hq * nQB, Bq * E]``."""
        if x.dim() == 3:
            return self._blocks(x.unsqueeze(-1), self.pad_q, self.bq)
        return self._blocks(x, self.pad_q, self.bq)

    def unblock_q(self, rows: Tensor, last: int | None) -> Tensor:
        B, Hq, _, Nq, _, _, _ = self.shape
        full = rows.view(B, Hq, self.n_qb * self.bq, *(() if last is None else (last,)))
        return full[:, :, :Nq] if self.pad_q else full

    def unblock_k(self, rows: Tensor, last: int) -> Tensor:
        B, _, Hkv, _, Nk, _, _ = self.shape
        full = rows.view(B, Hkv, self.n_kb * self.bk, last)
        return full[:, :, :Nk] if self.pad_k else full


def _chunks(plan: _Plan, bq: int, bk: int):
    hg, _ = plan.heads
    for run in plan.runs:
        per_tile = hg * bq * run.count * bk * 4
        size = max(1, CHUNK_BYTES // per_tile)
        for a in range(0, run.q_rows.shape[0], size):
            yield run, a, min(run.q_rows.shape[0], a + size)


def _partial_bias(plan: _Plan, run: _Run, tiles: Tensor, n: int, a: int, bq: int, bk: int, dtype) -> Tensor:
    """``[n, Bq, c, Bk]`` additive bias of the partial slots of tiles ``a + tiles`` (0 elsewhere)."""
    ti, sj, rows = run.partial
    bias = torch.zeros(n, bq, run.count, bk, dtype=dtype, device=run.q_rows.device)
    sel = (ti >= a) & (ti < a + tiles)
    hidden = ~plan.masks[rows[sel]]
    values = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
    bias[ti[sel] - a, :, sj[sel], :] = values
    return bias


def _bias(plan: _Plan, prob: _Problem, run: _Run, a: int, b: int, dtype: torch.dtype) -> Tensor | None:
    """Additive ``[n or 1, 1, Bq, c * Bk]`` bias of tiles ``[a, b)`` of ``run`` (None: nothing hidden)."""
    if run.partial is None and prob.key_ok is None:
        return None
    n, c, bq, bk = b - a, run.count, prob.bq, prob.bk
    if run.partial is None:
        bias = torch.zeros(n, 1, bq, c * bk, dtype=dtype, device=run.q_rows.device)
    elif run.shared:  # one bias for the whole run, built once per plan and dtype
        key = (id(run), dtype)
        if key not in plan.biases:
            plan.biases[key] = _partial_bias(plan, run, 1, 1, 0, bq, bk, dtype).view(1, 1, bq, c * bk)
        bias = plan.biases[key]
    else:
        bias = _partial_bias(plan, run, b - a, n, a, bq, bk, dtype).view(n, 1, bq, c * bk)
    if prob.key_ok is not None:
        kb = run.k_rows[a:b, :c] % prob.n_kb  # the first head's blocks: the same for every head of the tile
        ok = prob.key_ok[(run.batch[a:b, None] * prob.n_kb + kb).reshape(-1)].view(n, 1, 1, c * bk)
        bias = bias.masked_fill(~ok, float("-inf"))
    return bias


def _empty_rows(plan: _Plan, run: _Run, bias: Tensor | None, padded: bool) -> Tensor | None:
    """Bool ``[n or 1, 1, Bq]``: rows of the chunk with no visible key (None: there are none)."""
    if bias is None:
        return None
    if run.shared and not padded:  # the run's one bias: look once
        key = (id(run), "empty")
        if key not in plan.biases:
            empty = torch.isneginf(bias).all(-1)
            plan.biases[key] = empty if bool(empty.any()) else None
        return plan.biases[key]
    return torch.isneginf(bias).all(-1)


def _gather(buf: _Buffers, prob: _Problem, run: _Run, a: int, b: int, hg: int, hgk: int, with_v: bool = True):
    n, c = b - a, run.count
    D, Dv = prob.shape[5], prob.shape[6]
    qg = buf.take("q", prob.q, run.q_rows[a:b].reshape(-1)).view(n, hg, prob.bq, D)
    k_rows = run.k_rows[a:b].reshape(-1)
    kg = buf.take("k", prob.k, k_rows).view(n, hgk, c * prob.bk, D)
    vg = buf.take("v", prob.v, k_rows).view(n, hgk, c * prob.bk, Dv) if with_v else None
    return qg, kg, vg


def _setup(q, k, v, layout: BlockLayout, kv_mask):
    """The block views, the cached plan, whether the flash kernel runs, and the accumulation dtype."""
    prob = _Problem(q, k, v, layout, kv_mask)
    B, Hq, Hkv = prob.shape[:3]
    plan = plan_for(layout, B, Hq, Hkv, kv_mask is not None, q.device)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return prob, plan, _use_flash(q, v), work


def _forward(q, k, v, layout: BlockLayout, scale: float, kv_mask):
    prob, plan, flash, work = _setup(q, k, v, layout, kv_mask)
    B, Hq, _, _, _, _, Dv = prob.shape
    hg, hgk = plan.heads
    rows = B * Hq * prob.n_qb
    alloc = torch.empty if plan.covered else torch.zeros
    out = alloc(rows, prob.bq * Dv, dtype=q.dtype, device=q.device)
    lse = alloc(rows, prob.bq, dtype=lse_dtype(q.dtype), device=q.device)
    if not plan.covered:
        lse.fill_(float("-inf"))
    raw = torch.zeros_like(lse)
    buf = _Buffers()
    for run, a, b in _chunks(plan, prob.bq, prob.bk):
        qg, kg, vg = _gather(buf, prob, run, a, b, hg, hgk)
        bias = _bias(plan, prob, run, a, b, q.dtype if flash else work)
        if flash:
            og, lg = _flash(qg, kg, vg, 0.0, False, attn_mask=bias, scale=scale)
        else:
            og, lg = _math_attend(qg, kg, vg, torch.zeros((), dtype=work) if bias is None else bias, scale)
        dest = run.q_rows[a:b].reshape(-1)
        raw.index_copy_(0, dest, lg.reshape(-1, prob.bq).to(raw.dtype))
        empty = _empty_rows(plan, run, bias, prob.key_ok is not None)
        if empty is not None:
            empty = empty.expand(lg.shape)
            lg, og = lg.masked_fill(empty, float("-inf")), og.masked_fill(empty[..., None], 0.0)
        lse.index_copy_(0, dest, lg.reshape(-1, prob.bq).to(lse.dtype))
        out.index_copy_(0, dest, og.reshape(-1, prob.bq * Dv).to(out.dtype))
    return prob.unblock_q(out, Dv), prob.unblock_q(lse, None), raw


def _backward(q, k, v, layout, scale, kv_mask, out, raw, grad_out, grad_lse):
    prob, plan, flash, work = _setup(q, k, v, layout, kv_mask)
    D, Dv = prob.shape[5:]
    hg, hgk = plan.heads
    dq = (torch.empty if plan.covered else torch.zeros)(prob.q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(prob.k.shape, dtype=work, device=k.device)
    dv = torch.zeros(prob.v.shape, dtype=work, device=v.device)
    of = prob.q_like(out)
    gof = prob.q_like(grad_out if grad_out is not None else torch.zeros_like(out))
    glf = None
    if grad_lse is not None:
        glf = prob.q_like(torch.where(torch.isfinite(grad_lse), grad_lse, 0.0))
    buf = _Buffers()
    for run, a, b in _chunks(plan, prob.bq, prob.bk):
        n = b - a
        qg, kg, vg = _gather(buf, prob, run, a, b, hg, hgk)
        src = run.q_rows[a:b].reshape(-1)
        og = buf.take("o", of, src).view(n, hg, prob.bq, Dv)
        gog = buf.take("go", gof, src).view(n, hg, prob.bq, Dv)
        lg = raw.index_select(0, src).view(n, hg, prob.bq)
        gl = None if glf is None else glf.index_select(0, src).view(n, hg, prob.bq, 1)
        bias = _bias(plan, prob, run, a, b, q.dtype if flash else work)
        if flash:
            dqg, dkg, dvg = _flash_chunk_backward(qg, kg, vg, og, lg, gog, gl, bias, scale)
        else:
            zero = torch.zeros((), dtype=work)
            dqg, dkg, dvg = _math_chunk_backward(qg, kg, vg, og, gog, gl, zero if bias is None else bias, scale)
        dq.index_copy_(0, src, dqg.reshape(-1, prob.bq * D).to(dq.dtype))
        k_rows = run.k_rows[a:b].reshape(-1)
        dk.index_add_(0, k_rows, dkg.reshape(-1, prob.bk * D).to(work))
        dv.index_add_(0, k_rows, dvg.reshape(-1, prob.bk * Dv).to(work))
    return prob.unblock_q(dq, D), prob.unblock_k(dk, D).to(k.dtype), prob.unblock_k(dv, Dv).to(v.dtype)


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float, kv_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, Hq, Nq, D]`` over ``k``/``v [B, Hkv, Nk, D]`` restricted to ``layout``.

    Returns ``out [B, Hq, Nq, Dv]`` (0 for queries that see no key) and the log-sum-exp
    ``[B, Hq, Nq]`` (float32, ``-inf`` for those rows); both differentiable.
    """
    layout.check_call(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return recomputed_attention(_forward, _backward, q, k, v, layout, scale, kv_mask)
