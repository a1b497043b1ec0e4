"""Tile attention: the shared kernel of the local (and block-sparse) methods.

A :class:`TileLayout` splits the queries into tiles of ``Tq`` positions; each tile attends a
list of ``S`` key positions, and a boolean mask ``[Tq, S]`` says which of those keys each of
its queries sees. :func:`tile_attention` runs every tile as one small dense attention:

* On the CPU (value head size equal to the query head size) each chunk of tiles goes through
  the fused flash kernel SDPA itself uses (``aten::_scaled_dot_product_flash_attention_for_cpu``)
  with the tiles as its batch dimension, so scores never leave the cache. Tiles whose queries
  and keys are contiguous and evenly spaced (a sliding window's interior) are read through
  strided views with no copy; the others gather their rows with ``index_select``. Tiles that
  share a mask (interior tiles are translation invariant) share one ``[Tq, S]`` bias.
* Elsewhere a plain-PyTorch path computes the same thing with ``matmul`` and ``softmax``.

The backward recomputes each chunk (FlashAttention-2 style) from the saved output and
log-sum-exp, so memory is O(N) plus one chunk's workspace; key and value gradients are
accumulated with ``index_add_`` in float32. Work is proportional to the number of tiles times
``Tq * S``: the layout's tightness is the kernel's efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reference import lse_dtype

# Tiles per chunk: as many as make this many bytes of scores over all heads. The flash kernel never
# materialises them; the bound keeps each chunk's gathered inputs and outputs small (measured: 4 to
# 128 MiB give the same speed, benchmarks/local_attention.py shapes).
CHUNK_BYTES = 8 * 2**20

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Run:
    """Consecutive tiles ``[t0, t1)`` processed alike.

    ``mask`` is the mask id all of them share (else ``None``: per-tile masks). When
    ``q_start`` is set, tile ``t`` holds queries ``q_start + (t - t0) * Tq + [0, Tq)``; when
    ``k_start`` is set it reads keys ``k_start + (t - t0) * k_step + [0, S)``.
    """

    t0: int
    t1: int
    mask: int | None
    q_start: int | None = None
    k_start: int | None = None
    k_step: int = 0


@dataclass(frozen=True)
class TileLayout:
    """Which keys each query tile attends (``-1`` pads a slot).

    ``q_index [T, Tq]`` holds flat query positions. ``k_index [T, S]`` holds positions in the
    *key source*: the keys gathered once along ``key_source [P]`` (flat key positions), or the
    keys themselves when ``key_source`` is None. ``mask_id [T]`` indexes ``masks`` (bool
    ``[M, Tq, S]``, False on padded slots); the ``runs`` cover ``[0, T)`` in order. Every query
    position appears in at most one tile; queries in no tile get a zero output.
    """

    q_index: Tensor
    k_index: Tensor
    mask_id: Tensor
    masks: Tensor
    runs: tuple[Run, ...]
    key_source: Tensor | None = None

    @property
    def q_tile(self) -> int:
        return self.q_index.shape[1]

    @property
    def span(self) -> int:
        return self.k_index.shape[1]

    @property
    def num_tiles(self) -> int:
        return self.q_index.shape[0]

    def visible_pairs(self) -> int:
        """How many (query, key) pairs the layout's masks allow: the essential work."""
        per_mask = self.masks.sum(dim=(1, 2))
        return int(per_mask[self.mask_id].sum())


_LAYOUTS: dict[tuple, TileLayout] = {}
LAYOUT_CACHE_SIZE = 64


def cached_layout(key: tuple, build) -> TileLayout:
    """The layout for ``key`` (everything it depends on: sizes, parameters, causality, device),
    built by ``build()`` on first use. Training calls the same shapes every step, so a layout is
    built once; the cache forgets its oldest entry past :data:`LAYOUT_CACHE_SIZE`."""
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = build()
        if len(_LAYOUTS) >= LAYOUT_CACHE_SIZE:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    return layout


def plan_runs(q_index: Tensor, k_index: Tensor, mask_id: Tensor) -> tuple[Run, ...]:
    """Group consecutive tiles with one mask id, marking contiguous, evenly spaced ones."""
    T, Tq = q_index.shape
    S = k_index.shape[1]
    q0, k0 = q_index[:, 0], k_index[:, 0]
    q_contig = (q_index == q0[:, None] + torch.arange(Tq, device=q_index.device)).all(1) & (q0 >= 0)
    k_contig = (k_index == k0[:, None] + torch.arange(S, device=k_index.device)).all(1) & (k0 >= 0)
    ids, q0, k0 = mask_id.tolist(), q0.tolist(), k0.tolist()
    q_contig, k_contig = q_contig.tolist(), k_contig.tolist()
    runs: list[Run] = []
    t = 0
    while t < T:
        q_view, k_view = q_contig[t], k_contig[t]
        step = k0[t + 1] - k0[t] if t + 1 < T else 0
        end = t + 1
        while end < T and ids[end] == ids[t]:
            if k_view and not (k_contig[end] and k0[end] == k0[t] + (end - t) * step):
                break
            if q_view and not (q_contig[end] and q0[end] == q0[t] + (end - t) * Tq):
                break
            end += 1
        runs.append(
            Run(t, end, ids[t], q0[t] if q_view else None, k0[t] if k_view else None, step if end - t > 1 else 0)
        )
        t = end
    return tuple(runs)


def _flat_rows(x: Tensor, idx: Tensor) -> Tensor:
    """Row indices of ``x [BH, N, E]`` viewed as ``[BH * N, E]`` for positions ``idx`` of every head
    (index_select along dim 0 of a 2-D view is several times faster than along dim 1)."""
    heads = torch.arange(x.shape[0], device=idx.device)[:, None] * x.shape[1]
    return (heads + idx[None, :]).reshape(-1)


def take(x: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """``x [BH, N, E]`` at positions ``idx [P]`` of every head: ``[BH, P, E]``."""
    rows = x.reshape(-1, x.shape[2])
    if out is None:
        return rows.index_select(0, _flat_rows(x, idx)).view(x.shape[0], idx.numel(), x.shape[2])
    return torch.index_select(rows, 0, _flat_rows(x, idx), out=out.view(-1, x.shape[2])).view(out.shape)


def _add_rows(dest: Tensor, idx: Tensor, rows: Tensor) -> None:
    """``dest [BH, N, E]`` at positions ``idx [P]`` of every head += ``rows [BH, P, E]`` (repeats add up)."""
    flat = dest.view(-1, dest.shape[2])
    flat.index_add_(0, _flat_rows(dest, idx), rows.reshape(-1, dest.shape[2]))


def _use_flash(q: Tensor, v: Tensor) -> bool:
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


class _Chunks:
    """Reads and writes the tiles of one chunk for a ``[BH, N, D]`` view of the inputs."""

    def __init__(self, layout: TileLayout, heads: int, budget: int) -> None:
        self.layout = layout
        per_tile = heads * layout.q_tile * layout.span * 4
        self.size = max(1, budget // per_tile)
        self._buffers: dict[str, Tensor] = {}

    def _gather(self, name: str, x: Tensor, idx: Tensor) -> Tensor:
        """``take(x, idx)`` into a buffer reused across the chunks of a call (one allocation)."""
        shape = (x.shape[0], idx.shape[0], x.shape[2])
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < shape[0] * shape[1] * shape[2] or buf.dtype != x.dtype:
            buf = x.new_empty(shape[0] * self.size * max(self.layout.q_tile, self.layout.span) * shape[2])
            self._buffers[name] = buf
        return take(x, idx, out=buf[: shape[0] * shape[1] * shape[2]].view(shape))

    def chunks(self):
        for run in self.layout.runs:
            for a in range(run.t0, run.t1, self.size):
                yield run, a, min(run.t1, a + self.size)

    def read_q(self, x: Tensor, run: Run, a: int, b: int, name: str = "q") -> Tensor:
        """``x [BH, N, E]`` -> ``[n, BH, Tq, E]`` for tiles [a, b)."""
        n, Tq = b - a, self.layout.q_tile
        if run.q_start is not None:
            start = run.q_start + (a - run.t0) * Tq
            return x[:, start : start + n * Tq].unflatten(1, (n, Tq)).transpose(0, 1)
        idx = self.layout.q_index[a:b].reshape(-1).clamp(min=0)
        return self._gather(name, x, idx).unflatten(1, (n, Tq)).transpose(0, 1)

    def read_k(self, x: Tensor, run: Run, a: int, b: int, name: str = "k") -> Tensor:
        """``x [BH, N, E]`` -> ``[n, BH, S, E]`` for tiles [a, b) (a strided view where possible)."""
        n, S = b - a, self.layout.span
        if run.k_start is not None:
            start = run.k_start + (a - run.t0) * run.k_step
            s0, s1, s2 = x.stride()
            return x.as_strided(
                (n, x.shape[0], S, x.shape[2]), (run.k_step * s1, s0, s1, s2), x.storage_offset() + start * s1
            )
        idx = self.layout.k_index[a:b].reshape(-1).clamp(min=0)
        return self._gather(name, x, idx).unflatten(1, (n, S)).transpose(0, 1)

    def k_rows(self, run: Run, a: int, b: int) -> Tensor:
        if run.k_start is not None:
            start = run.k_start + (a - run.t0) * run.k_step
            offsets = torch.arange(b - a, device=self.layout.k_index.device)[:, None] * run.k_step
            return (start + offsets + torch.arange(self.layout.span, device=offsets.device)).reshape(-1)
        return self.layout.k_index[a:b].reshape(-1).clamp(min=0)

    def write_q(self, dest: Tensor, tiles: Tensor, run: Run, a: int, b: int) -> None:
        """Store ``tiles [n, BH, Tq, ...]`` into ``dest [BH, N, ...]`` (padded slots dropped)."""
        n, Tq = b - a, self.layout.q_tile
        rows = tiles.transpose(0, 1).reshape(dest.shape[0], n * Tq, *dest.shape[2:])
        if run.q_start is not None:
            start = run.q_start + (a - run.t0) * Tq
            dest[:, start : start + n * Tq] = rows
            return
        idx = self.layout.q_index[a:b].reshape(-1)
        keep = idx >= 0
        if not bool(keep.all()):
            idx, rows = idx[keep], rows[:, keep]
        flat = dest.view(-1, *dest.shape[2:])
        flat.index_copy_(0, _flat_rows(dest, idx), rows.to(dest.dtype).reshape(-1, *dest.shape[2:]))

    def bias(self, run: Run, a: int, b: int, key_ok: Tensor | None, dtype: torch.dtype, table: Tensor) -> Tensor:
        """Additive mask ``[n or 1, 1, Tq, S]`` (0 visible, -inf hidden)."""
        if run.mask is not None and key_ok is None:
            return table[run.mask][None, None]
        visible = self.layout.masks[self.layout.mask_id[a:b]]
        if key_ok is not None:
            visible = visible & key_ok[self.k_rows(run, a, b)].view(b - a, 1, self.layout.span)
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))[
            :, None
        ]


def _bias_table(masks: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(masks.shape, dtype=dtype, device=masks.device).masked_fill_(~masks, float("-inf"))


def _groups(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, source: Tensor | None):
    """``(slice of batch, q [BH, Nq, D], k [BH, P, D], v, key_ok [P])``: the batch merged into the
    heads (or one batch element at a time when padding differs between them), keys and values
    gathered along the layout's key source."""
    if kv_mask is None:
        parts = [(slice(None), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), None)]
    else:
        parts = [(slice(b, b + 1), q[b], k[b], v[b], kv_mask[b]) for b in range(q.shape[0])]
    for sl, qf, kf, vf, key_ok in parts:
        if source is not None:
            kf, vf = take(kf, source), take(vf, source)
            key_ok = None if key_ok is None else key_ok[source]
        yield sl, qf, kf, vf, key_ok


def _math_attend(qg: Tensor, kg: Tensor, vg: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch attention of one chunk: ``[n, BHq, Tq, D]`` x ``[n, BHkv, S, D]``."""
    groups = qg.shape[1] // kg.shape[1]
    if groups > 1:
        kg, vg = kg.repeat_interleave(groups, dim=1), vg.repeat_interleave(groups, dim=1)
    s = torch.matmul(qg, kg.transpose(-1, -2)).to(bias.dtype) * scale + bias
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    p = torch.exp(s - safe[..., None])
    return torch.matmul(p.to(vg.dtype), vg), lse


def _forward(q, k, v, kv_mask, layout: TileLayout, scale: float):
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[-1]
    flash = _use_flash(q, v)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    table = _bias_table(layout.masks, q.dtype if flash else work)
    covered = int((layout.q_index >= 0).sum()) == Nq  # every query in a tile: no need to zero
    alloc = torch.empty if covered else torch.zeros
    out = alloc(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = alloc(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
    if not covered:
        lse.fill_(float("-inf"))
    raw = torch.empty_like(lse)  # the kernel's own log-sum-exp, what its backward expects
    row_empty = ~layout.masks.any(-1)  # [M, Tq]
    mask_has_empty = row_empty.any(-1).tolist()
    for sl, qf, kf, vf, key_ok in _groups(q, k, v, kv_mask, layout.key_source):
        io = _Chunks(layout, qf.shape[0], CHUNK_BYTES)
        of, lf, rf = out[sl].flatten(0, 1), lse[sl].flatten(0, 1), raw[sl].flatten(0, 1)
        for run, a, b in io.chunks():
            qg, kg, vg = io.read_q(qf, run, a, b), io.read_k(kf, run, a, b), io.read_k(vf, run, a, b, "v")
            bias = io.bias(run, a, b, key_ok, table.dtype, table)
            if flash:
                og, lg = _flash(qg, kg, vg, 0.0, False, attn_mask=bias, scale=scale)
            else:
                og, lg = _math_attend(qg, kg, vg, bias, scale)
            io.write_q(rf.unsqueeze(-1), lg.to(rf.dtype).unsqueeze(-1), run, a, b)
            if key_ok is not None or run.mask is None:
                empty = torch.isneginf(bias).all(-1)  # [n, 1, Tq]
            elif mask_has_empty[run.mask]:
                empty = row_empty[run.mask][None, None]
            else:
                empty = None
            if empty is not None:
                empty = empty.expand(lg.shape)
                lg, og = lg.masked_fill(empty, float("-inf")), og.masked_fill(empty[..., None], 0.0)
            io.write_q(lf.unsqueeze(-1), lg.to(lf.dtype).unsqueeze(-1), run, a, b)
            io.write_q(of, og, run, a, b)
    return out, lse, raw


def _backward(q, k, v, kv_mask, layout, scale, out, raw, grad_out, grad_lse):
    Nq = q.shape[2]
    flash = _use_flash(q, v)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    table = _bias_table(layout.masks, q.dtype if flash else work)
    covered = int((layout.q_index >= 0).sum()) == Nq
    dq = torch.empty_like(q) if covered else torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=work, device=k.device)
    dv = torch.zeros(v.shape, dtype=work, device=v.device)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.contiguous()
    for sl, qf, kf, vf, key_ok in _groups(q, k, v, kv_mask, layout.key_source):
        io = _Chunks(layout, qf.shape[0], CHUNK_BYTES)
        of, rf, gof = out[sl].flatten(0, 1), raw[sl].flatten(0, 1), grad_out[sl].flatten(0, 1)
        glf = grad_lse[sl].flatten(0, 1) if grad_lse is not None else None
        dqf, dkf, dvf = dq[sl].flatten(0, 1), dk[sl].flatten(0, 1), dv[sl].flatten(0, 1)
        if layout.key_source is not None:  # accumulate in source order, scatter back once
            dk_out, dv_out = dkf, dvf
            dkf = torch.zeros(kf.shape, dtype=work, device=kf.device)
            dvf = torch.zeros(vf.shape, dtype=work, device=vf.device)
        for run, a, b in io.chunks():
            qg, kg, vg = io.read_q(qf, run, a, b), io.read_k(kf, run, a, b), io.read_k(vf, run, a, b, "v")
            og, gog = io.read_q(of, run, a, b, "o"), io.read_q(gof, run, a, b, "go")
            lg = io.read_q(rf.unsqueeze(-1), run, a, b, "lse").squeeze(-1)
            gl = None
            if glf is not None:
                gl = io.read_q(glf.unsqueeze(-1), run, a, b, "glse")
                gl = gl.masked_fill(~torch.isfinite(gl), 0.0)
            bias = io.bias(run, a, b, key_ok, table.dtype, table)
            if flash:
                dqg, dkg, dvg = _flash_chunk_backward(qg, kg, vg, og, lg, gog, gl, bias, scale)
            else:
                dqg, dkg, dvg = _math_chunk_backward(qg, kg, vg, og, gog, gl, bias, scale)
            io.write_q(dqf, dqg, run, a, b)
            rows = io.k_rows(run, a, b)
            _add_rows(dkf, rows, dkg.transpose(0, 1).to(work))
            _add_rows(dvf, rows, dvg.transpose(0, 1).to(work))
        if layout.key_source is not None:
            _add_rows(dk_out, layout.key_source, dkf)
            _add_rows(dv_out, layout.key_source, dvf)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _flash_chunk_backward(qg, kg, vg, og, lg, gog, gl, bias, scale):
    qg, kg, vg, og, gog = (t.contiguous() for t in (qg, kg, vg, og, gog))
    lg = lg.contiguous()
    dqg, dkg, dvg = _flash_backward(gog, qg, kg, vg, og, lg, 0.0, False, attn_mask=bias, scale=scale)
    if gl is not None:
        # d lse_i / d s_ij = p_ij: dq_i += scale g_i sum_j p_ij k_j, dk_j += scale sum_i g_i p_ij q_i
        attended, _ = _flash(qg, kg, kg, 0.0, False, attn_mask=bias, scale=scale)
        dqg = dqg + (scale * gl * attended.to(gl.dtype)).to(dqg.dtype)
        gq = (gl * qg.to(gl.dtype)).to(qg.dtype)
        _, _, dk_extra = _flash_backward(gq, qg, kg, kg, attended, lg, 0.0, False, attn_mask=bias, scale=scale)
        dkg = dkg + scale * dk_extra
    return dqg, dkg, dvg


def _math_chunk_backward(qg, kg, vg, og, gog, gl, bias, scale):
    groups = qg.shape[1] // kg.shape[1]
    ke = kg.repeat_interleave(groups, dim=1) if groups > 1 else kg
    ve = vg.repeat_interleave(groups, dim=1) if groups > 1 else vg
    work = bias.dtype
    s = torch.matmul(qg, ke.transpose(-1, -2)).to(work) * scale + bias
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0))
    go = gog.to(work)
    dp = torch.matmul(go, ve.transpose(-1, -2).to(work))
    delta = (go * og.to(work)).sum(-1, keepdim=True)
    if gl is not None:
        delta = delta - gl.to(work)
    ds = p * (dp - delta) * scale
    dqg = torch.matmul(ds, ke.to(work))
    dkg = torch.matmul(ds.transpose(-1, -2), qg.to(work))
    dvg = torch.matmul(p.transpose(-1, -2), go)
    if groups > 1:
        dkg = dkg.unflatten(1, (-1, groups)).sum(2)
        dvg = dvg.unflatten(1, (-1, groups)).sum(2)
    return dqg.to(qg.dtype), dkg, dvg


class _Recomputed(torch.autograd.Function):
    """Autograd for a chunked kernel: ``forward(q, k, v, *args) -> (out, lse, raw)`` and
    ``backward(q, k, v, *args, out, raw, grad_out, grad_lse) -> (dq, dk, dv)``, the backward
    recomputing from the saved output and the kernel's own log-sum-exp ``raw``."""

    @staticmethod
    def forward(ctx, forward, backward, q, k, v, *args):
        out, lse, raw = forward(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, raw)
        ctx.backward_fn, ctx.args = backward, args
        ctx.set_materialize_grads(False)  # an unused log-sum-exp costs nothing in the backward
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, raw = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(q, k, v, *ctx.args, out, raw, grad_out, grad_lse)
        return None, None, dq, dk, dv, *(None for _ in ctx.args)


def recomputed_attention(forward, backward, q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a chunked kernel (see :class:`_Recomputed`), differentiable when an input requires grad."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Recomputed.apply(forward, backward, q, k, v, *args)
    out, lse, _ = forward(q, k, v, *args)
    return out, lse


def tile_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, scale: float, kv_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, Hq, Nq, D]`` over ``k``/``v [B, Hkv, Nk, D]`` restricted to ``layout``.

    Returns ``out [B, Hq, Nq, Dv]`` in the input dtype (0 for queries that see no key) and the
    log-sum-exp ``[B, Hq, Nq]`` (float32, ``-inf`` for those rows); both differentiable.
    """
    return recomputed_attention(_forward, _backward, q, k, v, kv_mask, layout, scale)
