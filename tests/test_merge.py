"""merge_attention_states: attention over the union of key sets, from its parts."""

import itertools

import pytest
import torch

import attnzoo


@pytest.mark.parametrize("seed", range(6))
def test_random_key_splits_merge_exactly(seed):
    gen = torch.Generator().manual_seed(seed)
    nk = int(torch.randint(2, 90, (1,), generator=gen))
    q = torch.randn(2, 4, 17, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, nk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, nk, 8, generator=gen, dtype=torch.float64)
    cuts = sorted(torch.randperm(nk - 1, generator=gen)[: int(torch.randint(1, min(6, nk), (1,), generator=gen))] + 1)
    bounds = [0, *[int(c) for c in cuts], nk]
    parts = [attnzoo.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in itertools.pairwise(bounds)]
    out, lse = attnzoo.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    expected, expected_lse = attnzoo.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)


def test_empty_parts_weigh_nothing_and_gradients_stay_finite():
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 10, 4, dtype=torch.float64), torch.randn(1, 2, 10, 4, dtype=torch.float64)
    seen = torch.zeros(1, 10, dtype=torch.bool)
    seen[0, :4] = True
    o1, l1 = attnzoo.attention(q, k, v, kv_mask=seen, return_lse=True)
    o2, l2 = attnzoo.attention(q, k, v, kv_mask=torch.zeros_like(seen), return_lse=True)  # all hidden
    assert torch.isneginf(l2).all() and torch.equal(o2, torch.zeros_like(o2))
    o1.requires_grad_()
    out, lse = attnzoo.merge_attention_states([o1, o2], [l1, l2])
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)
    out.sum().backward()
    assert torch.isfinite(o1.grad).all()
    everything_empty, lse_empty = attnzoo.merge_attention_states([o2, o2], [l2, l2])
    assert torch.equal(everything_empty, o2) and torch.isneginf(lse_empty).all()


def test_merge_is_differentiable_through_lse():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def split_then_merge(q, k, v):
        a = attnzoo.attention(q, k[:, :, :2], v[:, :, :2], return_lse=True)
        b = attnzoo.attention(q, k[:, :, 2:], v[:, :, 2:], return_lse=True)
        return attnzoo.merge_attention_states([a[0], b[0]], [a[1], b[1]])

    assert torch.autograd.gradcheck(split_then_merge, (q, k, v))


def test_merge_rejects_mismatched_parts():
    o = torch.zeros(1, 2, 5, 4)
    lse = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="equal length"):
        attnzoo.merge_attention_states([o, o], [lse])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        attnzoo.merge_attention_states([o, o[:, :1]], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[0\]"):
        attnzoo.merge_attention_states([o], [lse[..., :3]])
    with pytest.raises(TypeError, match="sequences"):
        attnzoo.merge_attention_states(o, lse)
