"""Fixed block-sparse patterns with random blocks: ``bigbird`` and ``subsampled`` (the band-based
``longformer`` and ``strided`` are in :mod:`.strided`).

Conventions shared by the four: self-attention only (``Nq == Nk``), blocks of ``block_size``
positions counted from position 0 (the last block may be shorter), ``is_causal=True`` intersects
the pattern with ``j <= i``. Random choices are a pure function of ``(seed, head, query block,
...)`` through an integer hash (:func:`hashed_bits`), never of the sequence length, so causal
outputs are prefix consistent and the reference and the fast path draw the same blocks.

Queries that attend every key (BigBird's global blocks, Longformer's global tokens) do not widen
the main layout to every key block: they are gathered and run as a second, small layout over all
keys, and their rows are copied over the main result, so the main layout stays O(N / block) wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import stats
from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout
from ..kernels.blocksparse import block_attention
from ..kernels.tiles import cached_layout
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder
from ._selection import num_blocks
from .block_sparse import causal_visibility, reference_layout, run_layout

CAPABILITIES = Capabilities(causal=True, noncausal=True, cross=False, gqa=True, kv_mask=True, lse=True, decode=True)
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- shared pieces
def _mul32(x, m: int):
    """``x * m mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * m + ((((x >> 16) * m) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A bijective 32-bit integer mixer (Wellons' lowbias32) on Python ints or int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_bits(seed: int, *indices: Tensor | int, device: torch.device | str = "cpu") -> Tensor:
    """24 pseudo-random bits (int64 in ``[0, 2**24)``) for every element of the broadcast
    non-negative ``indices``: a pure function of ``seed`` and the indices (the same on every
    device and for every sequence length). Uniform enough for sampling blocks."""
    h = _mix32(_mix32(seed & _M32) ^ ((seed >> 32) & _M32))
    out = torch.full((), h, dtype=torch.int64, device=device)
    for index in indices:
        out = _mix32(out ^ torch.as_tensor(index, dtype=torch.int64, device=device))
    return out >> 8


def global_query_layout(rows: Tensor, kv_len: int, block: int, causal: bool) -> BlockLayout:
    """Layout of the gathered queries at sorted original positions ``rows`` over every key block
    (with ``is_causal``: keys up to each query's own position, a ``mask_mod`` in original positions)."""
    n_rows, n_kb = rows.numel(), num_blocks(kv_len, block)
    dev = rows.device
    n_sb = num_blocks(n_rows, block)
    kb = torch.arange(n_kb, device=dev).expand(n_sb, n_kb)
    if not causal:
        return BlockLayout.from_block_lists(kb, n_rows, kv_len, block)
    first = rows[torch.arange(n_sb, device=dev) * block]
    last = rows[torch.clamp(torch.arange(1, n_sb + 1, device=dev) * block, max=n_rows) - 1]
    idx = torch.where(kb * block <= last[:, None], kb, -1)
    full = torch.clamp((kb + 1) * block, max=kv_len) - 1 <= first[:, None]

    def up_to_own_position(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= rows[q_idx]

    return BlockLayout.from_block_lists(idx, n_rows, kv_len, block, full, up_to_own_position)


def run_with_global_queries(call: AttentionCall, main: BlockLayout, rows: Tensor | None, glob: BlockLayout | None):
    """``main`` over every query, then the queries at ``rows`` replaced by their attention under
    ``glob`` (gathered queries over all keys). Returns ``(out, lse)``."""
    if rows is None or glob is None:
        return block_attention(call.query, call.key, call.value, main, call.scale, call.kv_mask)
    if rows.numel() == call.q_len:  # every query is global: nothing left for the main layout
        return block_attention(call.query, call.key, call.value, glob, call.scale, call.kv_mask)
    out, lse = block_attention(call.query, call.key, call.value, main, call.scale, call.kv_mask)
    q_glob = call.query.index_select(2, rows)
    out_g, lse_g = block_attention(q_glob, call.key, call.value, glob, call.scale, call.kv_mask)
    return out.index_copy(2, rows, out_g), lse.index_copy(2, rows, lse_g)


def visited_pairs(layout: BlockLayout | None, q_len: int) -> float:
    return 0.0 if layout is None else layout.density() * q_len * layout.kv_len


def run_planned(name: str, call: AttentionCall, plan) -> AttentionOutput:
    """Run a ``(main, rows, glob)`` plan (see :func:`run_with_global_queries`) and report its density."""
    main, rows, glob = plan
    out, lse = run_with_global_queries(call, main, rows, glob)
    if stats.active():
        visited = visited_pairs(main, call.q_len) + (0.0 if rows is None else visited_pairs(glob, rows.numel()))
        stats.record(name, density=visited / (call.q_len * call.kv_len))
    return AttentionOutput(out, lse if call.return_lse else None)


def mean_visible_keys(call: AttentionCall) -> float:
    """Keys a query may see, averaged over the queries: ``Nk``, or with ``is_causal`` (bottom-right
    aligned) ``mean_i clamp(i + Nk - Nq + 1, 0, Nk)``. Budgets count in these keys."""
    if not call.is_causal:
        return float(call.kv_len)
    counts = (torch.arange(call.q_len) + call.causal_offset + 1).clamp(0, call.kv_len)
    return float(counts.sum()) / call.q_len


def budget_block(keys: int, blocks: int, largest: int) -> int:
    """Block size for a budget of ``keys`` keys in about ``blocks`` blocks: the largest power of two
    at most ``keys / blocks``, within ``[1, largest]`` (powers of two divide the usual lengths, and
    change rarely as ``keys`` grows, which keeps the attended pairs monotone in ``keys``)."""
    return min(largest, 1 << (max(1, keys // blocks).bit_length() - 1))


def _expand_blocks(blocks: Tensor, n: int, block: int) -> Tensor:
    """Bool ``[..., nB, nB]`` block matrix -> ``[..., n, n]`` element matrix."""
    pos = torch.arange(n, device=blocks.device) // block
    return blocks[..., pos, :][..., pos]


# ----------------------------------------------------------------------------- bigbird
@dataclass(frozen=True)
class BigBirdParams(MethodParams):
    block_size: int = param(64, "positions per block (queries and keys)")
    window: int = param(3, "odd number of key blocks centred on each query block")
    global_blocks: int = param(1, "the first and the last `global_blocks` blocks are global (causal: the first)")
    random_blocks: int = param(3, "random key blocks per query block and head, among those not already visited")
    seed: int = param(0, "seed of the random blocks")

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number of blocks >= 1, got {self.window}")
        if self.global_blocks < 0:
            raise ValueError(f"global_blocks must be >= 0, got {self.global_blocks}")
        if self.random_blocks < 0:
            raise ValueError(f"random_blocks must be >= 0, got {self.random_blocks}")


def _bigbird_candidates(nb: int, p: BigBirdParams, causal: bool, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per query block, the blocks a random draw may pick: ``[g, lo_end)`` then ``[hi_start, limit)``
    (the window and the global blocks removed; causal: past blocks only). Returns ``(m_left,
    hi_start, m)`` with ``m`` the number of candidates (0 for global query blocks)."""
    half, g = (p.window - 1) // 2, p.global_blocks
    qb = torch.arange(nb, device=device)
    limit = qb + 1 if causal else torch.full_like(qb, nb - g)
    m_left = (torch.minimum(qb - half, limit) - g).clamp(min=0)
    hi_start = torch.clamp(qb + half + 1, min=g)
    m = m_left + (limit - hi_start).clamp(min=0)
    if not causal:
        m = torch.where((qb < g) | (qb >= nb - g), 0, m)
    return m_left, hi_start, m


def random_blocks(nb: int, heads: int, p: BigBirdParams, causal: bool, device) -> Tensor:
    """BigBird's random key blocks, ``[heads, nb, random_blocks]`` (``-1`` where fewer candidates).

    For each head and query block, ``min(r, m)`` distinct blocks drawn uniformly from its ``m``
    candidates (see :func:`_bigbird_candidates`) by Floyd's algorithm: step ``s`` draws ``t``
    uniform in ``[0, j]`` with ``j = m - min(r, m) + s`` and keeps ``j`` if ``t`` was already
    taken, else ``t``. The draws are :func:`hashed_bits` of ``(seed, head, block, s)``; shared by
    the reference and the fast path."""
    r = p.random_blocks
    with torch.no_grad():
        m_left, hi_start, m = _bigbird_candidates(nb, p, causal, device)
        take = m.clamp(max=r)
        h = torch.arange(heads, device=device)[:, None]
        qb = torch.arange(nb, device=device)[None, :]
        ranks = torch.full((heads, nb, r), -1, dtype=torch.int64, device=device)
        for s in range(r):
            j = m - take + s
            t = (hashed_bits(p.seed, h, qb, s, device=device) * (j + 1)) >> 24
            seen = (ranks[..., :s] == t[..., None]).any(-1)
            ranks[..., s] = torch.where(s < take, torch.where(seen, j, t), -1)
        blocks = torch.where(
            ranks < m_left[:, None], p.global_blocks + ranks, hi_start[:, None] + ranks - m_left[:, None]
        )
        return torch.where(ranks >= 0, blocks, -1)


def _bigbird_global_queries(nb: int, p: BigBirdParams, causal: bool, device) -> Tensor:
    """Bool ``[nb]``: query blocks that attend every key block. Causal: none needs a row of its
    own (the first blocks see exactly the global key blocks, the last ones are not global)."""
    qb = torch.arange(nb, device=device)
    g = p.global_blocks
    return torch.zeros(nb, dtype=torch.bool, device=device) if causal else (qb < g) | (qb >= nb - g)


def _bigbird_lists(call: AttentionCall, p: BigBirdParams, heads: int) -> Tensor:
    """``[1, heads, nb, window + 2 g + r]`` key blocks of every non-global query block (window,
    global key blocks, random blocks; duplicates and ``-1`` are removed by the layout)."""
    nb, dev, g = num_blocks(call.q_len, p.block_size), call.device, p.global_blocks
    causal = call.is_causal
    qb = torch.arange(nb, device=dev)[:, None]
    half = (p.window - 1) // 2
    win = qb + torch.arange(-half, half + 1, device=dev)
    win = torch.where((win >= 0) & (win < nb), win, -1)
    tails = [] if causal else [nb - g + torch.arange(g, device=dev)]
    glob = torch.cat([torch.arange(g, device=dev), *tails]).clamp(min=-1, max=nb - 1).expand(nb, -1)
    glob = torch.where(glob >= 0, glob, -1)
    fixed = torch.cat([win, glob], dim=-1).expand(heads, -1, -1)
    lists = torch.cat([fixed, random_blocks(nb, heads, p, causal, dev)], dim=-1)
    global_rows = _bigbird_global_queries(nb, p, causal, dev)
    return torch.where(global_rows[None, :, None], -1, lists)[None]


def _bigbird_plan(call: AttentionCall, p: BigBirdParams):
    heads = call.q_heads if p.random_blocks else 1
    key = ("bigbird", p, call.q_len, call.is_causal, heads, str(call.device))

    def build():
        lists = _bigbird_lists(call, p, heads)
        main = BlockLayout.from_block_lists(lists, call.q_len, call.kv_len, p.block_size)
        main = main.causal(call.causal_offset) if call.is_causal else main
        nb = num_blocks(call.q_len, p.block_size)
        global_rows = _bigbird_global_queries(nb, p, call.is_causal, call.device)
        if not bool(global_rows.any()):
            return main, None, None
        pos = torch.arange(call.q_len, device=call.device)
        rows = pos[global_rows[pos // p.block_size]]
        return main, rows, global_query_layout(rows, call.kv_len, p.block_size, False)

    return cached_layout(key, build)


def bigbird_layout(call: AttentionCall, p: BigBirdParams) -> BlockLayout:
    """The whole BigBird pattern as one per-head layout ``[1, H, nB, C]`` (global query rows
    list every block, so ``C`` is up to ``nB``): for inspection and kernel benchmarks. The fast
    path runs the same pattern as a narrow main layout plus the global query rows apart."""
    nb = num_blocks(call.q_len, p.block_size)
    lists = _bigbird_lists(call, p, call.q_heads if p.random_blocks else 1)
    global_rows = _bigbird_global_queries(nb, p, call.is_causal, call.device)
    every = torch.arange(nb, device=call.device).expand(*lists.shape[:2], nb, nb)
    width = max(lists.shape[-1], nb)
    lists = torch.nn.functional.pad(lists, (0, width - lists.shape[-1]), value=-1)
    every = torch.nn.functional.pad(every, (0, width - nb), value=-1)
    lists = torch.where(global_rows[None, None, :, None], every, lists)
    layout = BlockLayout.from_block_lists(lists, call.q_len, call.kv_len, p.block_size)
    return layout.causal(call.causal_offset) if call.is_causal else layout


def bigbird_reference(call: AttentionCall, p: BigBirdParams) -> AttentionOutput:
    """Dense softmax under BigBird's pattern, built block by block from the definition: the
    window ``|qb - kb| <= (window - 1) / 2``, global key and query blocks (the first and last
    ``global_blocks``; causal: the first), the random blocks of :func:`random_blocks`; expanded to
    elements and intersected with causality."""
    nb, dev, g = num_blocks(call.q_len, p.block_size), call.device, p.global_blocks
    qb = torch.arange(nb, device=dev)[:, None]
    kb = torch.arange(nb, device=dev)[None, :]
    glob_q = (qb < g) | (not call.is_causal and qb >= nb - g)
    glob_k = (kb < g) | (not call.is_causal and kb >= nb - g)
    blocks = ((qb - kb).abs() <= (p.window - 1) // 2) | glob_q | glob_k
    picks = random_blocks(nb, call.q_heads, p, call.is_causal, dev)
    chosen = torch.zeros(call.q_heads, nb, nb + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(picks >= 0, picks, nb), True)
    visible = _expand_blocks(blocks | chosen[..., :nb], call.q_len, p.block_size)[None]
    if call.is_causal:
        visible = visible & causal_visibility(call)
    return reference_layout(call, visible)


def _bigbird_budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query: blocks of about ``keys / 8`` (at most 64), the default window of 3
    blocks and 1 global block, random blocks for the rest (causal: the diagonal block counts half);
    from ``keys >= Nk`` on a window over every block (dense)."""
    block = budget_block(keys, 8, 64)
    if keys >= call.kv_len:
        return {"block_size": block, "window": 2 * num_blocks(call.kv_len, block) + 1}
    fixed = 2.5 if call.is_causal else 5.0  # window blocks (causal: 1.5) + global blocks (causal: 1)
    return {"block_size": block, "window": 3, "global_blocks": 1, "random_blocks": max(0, round(keys / block - fixed))}


def _bigbird_run(call: AttentionCall, p: BigBirdParams) -> AttentionOutput:
    return run_planned("bigbird", call, _bigbird_plan(call, p))


BIGBIRD = register(
    Method(
        name="bigbird",
        family="block_sparse",
        exact=False,
        summary=(
            "BigBird's block pattern: each query block attends a window of key blocks centred on it, the "
            "global blocks (the first and last `global_blocks`, whose queries also attend everything) and "
            "`random_blocks` key blocks drawn per head from the rest. The random draw is a seeded hash of "
            "(head, block), so it is fixed per seed; the block-sparse kernel's time is proportional to the blocks."
        ),
        paper=Paper(
            "Big Bird: Transformers for Longer Sequences (Zaheer et al., 2020)", "https://arxiv.org/abs/2007.14062"
        ),
        capabilities=CAPABILITIES,
        params=BigBirdParams,
        decoder=cached_decoder("bigbird"),
        reference=bigbird_reference,
        backends=(Backend("blocks", _bigbird_run, description="window, global and random blocks (block kernel)"),),
        test_params=(
            {"block_size": 8, "random_blocks": 2},
            {"block_size": 16, "window": 1, "global_blocks": 2, "random_blocks": 1, "seed": 5},
            {"block_size": 8, "window": 5, "global_blocks": 0, "random_blocks": 3},
        ),
        degenerate_params=lambda call: {"window": 2 * num_blocks(call.kv_len, 64) + 1},
        budget=_bigbird_budget,
        notes=(
            "Causal: only the first `global_blocks` are global (a global last block would make a query's "
            "output depend on the sequence length), and random blocks are drawn from the allowed past blocks."
        ),
    )
)


# ----------------------------------------------------------------------------- subsampled
@dataclass(frozen=True)
class SubsampledParams(MethodParams):
    keep: float = param(0.25, "probability of keeping each key block other than the query block's own")
    block_size: int = param(64, "positions per block (queries and keys)")
    training: bool = param(True, "False: full attention (the paper's inference mode)")
    seed: int = param(0, "seed of the draw; vary it every training step (e.g. pass the step number)")

    def validate(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def subsample_blocks(call: AttentionCall, p: SubsampledParams) -> Tensor:
    """Bool ``[1, Hq, nB, nB]``: the key blocks each query block keeps. Training: its own block
    always, every other one independently with probability ``keep`` (``hashed_bits(seed, head,
    query block, key block) < keep * 2**24``; causal: past blocks only); eval: every block.
    Shared by the reference and the fast path."""
    nb, dev = num_blocks(call.q_len, p.block_size), call.device
    with torch.no_grad():
        qb = torch.arange(nb, device=dev)[:, None]
        kb = torch.arange(nb, device=dev)[None, :]
        if not p.training:
            chosen = torch.ones(1, nb, nb, dtype=torch.bool, device=dev)
        else:
            h = torch.arange(call.q_heads, device=dev)[:, None, None]
            chosen = (hashed_bits(p.seed, h, qb, kb, device=dev) < round(p.keep * 2**24)) | (qb == kb)
        if call.is_causal:
            chosen = chosen & (kb <= qb)
        return chosen[None]


def subsampled_reference(call: AttentionCall, p: SubsampledParams) -> AttentionOutput:
    """Dense softmax over the keys of the kept blocks (:func:`subsample_blocks`), intersected with
    causality; no rescaling."""
    visible = _expand_blocks(subsample_blocks(call, p), call.q_len, p.block_size)
    if call.is_causal:
        visible = visible & causal_visibility(call)
    return reference_layout(call, visible)


def _subsampled_layout(call: AttentionCall, p: SubsampledParams) -> BlockLayout:
    def build() -> BlockLayout:
        chosen = subsample_blocks(call, p)
        layout = BlockLayout.from_dense_blocks(chosen, chosen, call.q_len, call.kv_len, (p.block_size,) * 2, None)
        return layout.causal(call.causal_offset) if call.is_causal else layout

    if p.training:  # the seed changes every step: caching would only evict other layouts
        return build()
    return cached_layout(("subsampled", p, call.q_len, call.is_causal, str(call.device)), build)


def _subsampled_budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query (in expectation): blocks of about ``Nk / 16`` (at most 64),
    fixed for the call so that a larger ``keep`` keeps a superset of the blocks (the draw is a
    threshold on fixed hashes), and ``keep`` the share of the other visible keys still needed
    beyond the own block (causal: half of it visible on average); 1 (dense) once ``keys`` covers
    every visible key."""
    block = budget_block(call.kv_len, 16, 64)
    own = block / 2 if call.is_causal else block
    rest = mean_visible_keys(call) - own
    keep = 1.0 if rest <= 0 else min(1.0, max(keys - own, 1.0) / rest)
    return {"block_size": block, "keep": float(keep)}


def _subsampled_run(call: AttentionCall, p: SubsampledParams) -> AttentionOutput:
    layout = _subsampled_layout(call, p)
    if stats.active():
        stats.record("subsampled", density=layout.density())
    return run_layout(call, layout)


SUBSAMPLED = register(
    Method(
        name="subsampled",
        family="block_sparse",
        exact=False,
        summary=(
            "Stochastic block subsampling of the attention (SSA): in training each query block keeps its own "
            "key block and every other key block independently with probability `keep`, per head, drawn from "
            "`seed` (vary it per step); plain softmax over the kept keys, no rescaling. training=False: full attention."
        ),
        paper=Paper(
            "The Information Pathways Hypothesis: Transformers are Dynamic Self-Ensembles (Hussain et al., 2023)",
            "https://arxiv.org/abs/2306.01705",
        ),
        capabilities=CAPABILITIES,
        params=SubsampledParams,
        decoder=cached_decoder("subsampled"),
        reference=subsampled_reference,
        backends=(Backend("blocks", _subsampled_run, description="kept blocks per head (block kernel)"),),
        test_params=(
            {"keep": 0.5, "block_size": 8},
            {"keep": 0.3, "block_size": 16, "seed": 3},
            {"keep": 0.5, "block_size": 8, "training": False},
        ),
        degenerate_params=lambda call: {"keep": 1.0},
        budget=_subsampled_budget,
    )
)

__all__ = [
    "BIGBIRD",
    "SUBSAMPLED",
    "BigBirdParams",
    "SubsampledParams",
    "bigbird_layout",
    "budget_block",
    "global_query_layout",
    "hashed_bits",
    "mean_visible_keys",
    "random_blocks",
    "run_planned",
    "run_with_global_queries",
    "subsample_blocks",
    "visited_pairs",
]
