"""The block-sparse engine: layouts (closed form, mask_mod, BlockMask), the kernel, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnzoo
from attnzoo import BlockLayout
from attnzoo.kernels.blocklayout import intersect_causal
from attnzoo.kernels.blocksparse import block_attention
from attnzoo.kernels.reference import safe_logsumexp


def _dense(q, k, v, visible, scale, kv_mask=None):
    """Float64 masked softmax, written out (the check every kernel result is held to)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    lse = safe_logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v, lse


def _mask_eval(mask_mod, B, H, Nq, Nk):
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    return mask_mod(b, h, torch.arange(Nq)[None, None, :, None], torch.arange(Nk)[None, None, None, :]).expand(
        B, H, Nq, Nk
    )


def _pattern(b, h, q, kv):
    """Irregular, batch- and head-dependent: exercises partial, full and empty blocks."""
    return (((q * 7 + kv * 3 + b * 5 + h * 11) % 5) < 2) | ((q // 16) == (kv // 16)) & (h == 0)


def _documents(b, h, q, kv):
    return (q // 24) == (kv // 24)


@pytest.mark.parametrize("block", [(8, 8), (16, 4), (5, 7)])
@pytest.mark.parametrize("mask_mod", [_pattern, _documents])
def test_from_mask_mod_matches_dense_evaluation(block, mask_mod):
    B, H, Nq, Nk = 2, 3, 37, 45
    layout = BlockLayout.from_mask_mod(mask_mod, Nq, Nk, block, batch=B, heads=H)
    expected = _mask_eval(mask_mod, B, H, Nq, Nk)
    dense = layout.to_dense().expand(B, H, Nq, Nk)
    assert torch.equal(dense, expected)
    # a block is listed iff it holds a visible element; full iff every element in range is visible
    bq, bk = block
    for gb in range(layout.groups[0]):
        for gh in range(layout.groups[1]):
            for qb in range(layout.num_q_blocks):
                row = expected[gb, gh, qb * bq : (qb + 1) * bq]
                n = int(layout.kv_num_blocks[gb, gh, qb])
                listed = layout.kv_indices[gb, gh, qb, :n].tolist()
                want = [kb for kb in range(layout.num_kv_blocks) if row[:, kb * bk : (kb + 1) * bk].any()]
                assert listed == want
                for slot, kb in enumerate(listed):
                    assert bool(layout.full[gb, gh, qb, slot]) == bool(row[:, kb * bk : (kb + 1) * bk].all())


def test_group_dims_follow_what_the_mask_mod_reads():
    assert BlockLayout.from_mask_mod(_documents, 40, 40, 8, batch=3, heads=4).groups == (1, 1)
    assert BlockLayout.from_mask_mod(_pattern, 40, 40, 8, batch=3, heads=4).groups == (3, 4)
    heads_only = BlockLayout.from_mask_mod(lambda b, h, q, kv: (q - kv).abs() <= h, 40, 40, 8, batch=3, heads=4)
    assert heads_only.groups == (1, 4)


def test_from_block_lists_sorts_dedupes_and_keeps_full():
    idx = torch.tensor([[3, 1, -1, 1], [0, 0, 2, -1]])
    full = torch.tensor([[True, False, False, True], [False, True, False, False]])
    layout = BlockLayout.from_block_lists(idx, 16, 32, 8, full, mask_mod=_documents)
    assert layout.kv_num_blocks.flatten().tolist() == [2, 2]
    assert layout.kv_indices[0, 0, 0, :2].tolist() == [1, 3]
    assert layout.full[0, 0, 0, :2].tolist() == [True, True]  # block 1 listed partial and full: full
    assert layout.kv_indices[0, 0, 1, :2].tolist() == [0, 2]
    assert layout.full[0, 0, 1, :2].tolist() == [True, False]


def test_density_of_block_diagonal():
    idx = torch.arange(8)[:, None]
    layout = BlockLayout.from_block_lists(idx, 64, 64, 8)
    assert layout.density() == pytest.approx(1 / 8)
    ragged = BlockLayout.from_block_lists(torch.arange(5)[:, None], 37, 37, 8)
    assert ragged.density() == pytest.approx((4 * 64 + 25) / 37**2)


def test_causal_intersection():
    layout = BlockLayout.from_mask_mod(_pattern, 30, 41, 8, batch=2, heads=3)
    for offset in (0, 11, -3):
        causal = intersect_causal(layout, offset)
        q = torch.arange(30)[:, None]
        kv = torch.arange(41)[None, :]
        assert torch.equal(causal.to_dense(), layout.to_dense() & (kv <= q + offset))
        assert causal.kv_num_blocks.sum() <= layout.kv_num_blocks.sum()


def _flex():
    return pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("mask_mod", [_pattern, _documents])
def test_block_mask_round_trip(mask_mod):
    flex = _flex()
    B, H, N = 2, 3, 48
    bm = flex.create_block_mask(mask_mod, B, H, N, N, device="cpu", BLOCK_SIZE=16)
    ours = BlockLayout.from_mask_mod(mask_mod, N, N, 16, batch=B, heads=H).expand_groups(B, H)
    converted = BlockLayout.from_block_mask(bm).expand_groups(B, H)
    assert torch.equal(converted.kv_num_blocks, ours.kv_num_blocks)
    assert torch.equal(converted.listed() & (converted.kv_indices == ours.kv_indices), ours.listed())
    assert torch.equal(converted.full & converted.listed(), ours.full & ours.listed())
    back = ours.to_block_mask()
    assert torch.equal(back.kv_num_blocks.expand(B, H, -1), bm.kv_num_blocks.expand(B, H, -1))
    assert torch.equal(back.full_kv_num_blocks.expand(B, H, -1), bm.full_kv_num_blocks.expand(B, H, -1))


def test_block_mask_gives_flex_attention_output():
    flex = _flex()
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    bm = flex.create_block_mask(_pattern, B, H, N, N, device="cpu", BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        expected = flex.flex_attention(q, k, v, block_mask=bm)
        from_ours = flex.flex_attention(
            q, k, v, block_mask=BlockLayout.from_mask_mod(_pattern, N, N, 16, batch=B, heads=H).to_block_mask()
        )
    found = attnzoo.attention(q, k, v, method="block_sparse", layout=bm)
    torch.testing.assert_close(found, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(from_ours, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_dense_with_padding_gqa_and_empty_rows(dtype):
    torch.manual_seed(1)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 37, 45, 8
    layout = BlockLayout.from_mask_mod(_pattern, Nq, Nk, (8, 4), batch=B, heads=Hq)
    kv_mask = torch.rand(B, Nk) < 0.6
    kv_mask[0] = False  # a sequence with no real key: every row of it is empty
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, dtype=torch.float64, requires_grad=True)
    out, lse = block_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, 0.3, kv_mask)
    ref_out, ref_lse = _dense(q, k, v, layout.to_dense(), 0.3, kv_mask)
    empty = torch.isneginf(ref_lse)
    assert empty.any(), "the pattern should leave some rows with no visible key"
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=tol, rtol=0)
    if dtype == torch.float64:
        go, gl = torch.randn_like(ref_out), torch.randn_like(ref_lse)
        found = torch.autograd.grad((out * go).sum() + (torch.where(empty, 0.0, lse) * gl).sum(), (q, k, v))
        want = torch.autograd.grad((ref_out * go).sum() + (torch.where(empty, 0.0, ref_lse) * gl).sum(), (q, k, v))
        for f, w in zip(found, want):
            assert torch.isfinite(f).all()
            torch.testing.assert_close(f, w, atol=1e-12, rtol=0)


def test_plan_is_built_once_per_shape():
    layout = BlockLayout.from_mask_mod(_documents, 64, 64, 16)
    q = torch.randn(1, 2, 64, 8)
    block_attention(q, q, q, layout, 0.5)
    plans = dict(layout._plans)
    block_attention(q, q, q, layout, 0.5)
    assert layout._plans == plans and len(plans) == 1


def test_time_is_proportional_to_visited_blocks():
    """The kernel touches only listed blocks: a layout with no block for some query block gives
    zeros there, and the chunks cover exactly the listed (tile, block) pairs."""
    from attnzoo.kernels.blocksparse import plan_for

    idx = torch.tensor([[0, -1], [-1, -1], [1, 2], [3, -1]])
    layout = BlockLayout.from_block_lists(idx, 32, 32, 8)
    plan = plan_for(layout, 1, 2, 2, False, torch.device("cpu"))
    assert sum(run.k_rows.numel() for run in plan.runs) == 2 * 4  # 4 listed blocks x 2 heads
    q = torch.randn(1, 2, 32, 8)
    out, lse = block_attention(q, q, q, layout, 0.5)
    assert (out[:, :, 8:16] == 0).all() and torch.isneginf(lse[:, :, 8:16]).all()


BAD = [
    ("layout", lambda q: {"layout": BlockLayout.from_mask_mod(_documents, 32, 32, 8)}, "q_len=32"),
    ("layout", lambda q: {"layout": BlockLayout.from_mask_mod(_pattern, 48, 48, 8, batch=3, heads=2)}, "group"),
    ("layout", lambda q: {"layout": "dense"}, "BlockLayout"),
    ("layout", lambda q: {}, "layout="),
    ("mask_mod", lambda q: {"mask_mod": 3}, "callable"),
    ("mask_mod", lambda q: {"mask_mod": lambda b, h, i, j: (i - j).float()}, "bool"),
    ("block_size", lambda q: {"mask_mod": _documents, "block_size": 0}, "block_size"),
    (
        "both",
        lambda q: {"mask_mod": _documents, "layout": BlockLayout.from_mask_mod(_documents, 48, 48, 8)},
        "not both",
    ),
]


@pytest.mark.parametrize("name,params,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_parameters_are_refused(name, params, message, monkeypatch):
    import attnzoo.kernels.blocksparse as kernel

    monkeypatch.setattr(kernel, "_forward", lambda *a, **k: pytest.fail("the kernel ran"))
    q = torch.randn(2, 2, 48, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        attnzoo.attention(q, q, q, method="block_sparse", **params(q))


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="kv_indices"):
        BlockLayout.from_block_lists(torch.tensor([[0, 9]]), 8, 16, 8)
    with pytest.raises(ValueError, match="mask_mod"):
        BlockLayout.from_block_lists(torch.tensor([[0]]), 8, 8, 8, full=False)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout.from_mask_mod(_documents, 8, 8, 0)
    with pytest.raises(ValueError, match="shape"):
        BlockLayout.from_mask_mod(lambda b, h, q, kv: torch.ones(3, 3, dtype=torch.bool), 8, 8, 4)


def test_training_through_block_sparse_in_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attnzoo.attention(q, k, v, is_causal=True, method="block_sparse", mask_mod=_documents, block_size=16)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (q, k, v))
