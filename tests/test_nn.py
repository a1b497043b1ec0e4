"""attnzoo.nn.MultiheadAttention."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo


def test_matches_manual_projection_and_sdpa():
    torch.manual_seed(0)
    layer = attnzoo.nn.MultiheadAttention(embed_dim=32, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 10, 32)
    q = layer.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(2, 10, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(2, 10, 2, 8).transpose(1, 2)
    expected = layer.out_proj(
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)
    )
    torch.testing.assert_close(layer(x, is_causal=True), expected)


def test_trains_and_cross_attends():
    layer = attnzoo.nn.MultiheadAttention(embed_dim=16, num_heads=2, backend="tiled")
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 9, 16)
    kv_mask = torch.ones(3, 9, dtype=torch.bool)
    kv_mask[0, 4:] = False
    layer(x, memory, kv_mask=kv_mask).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert "method='dense'" in repr(layer)


def test_dropout_only_in_training():
    layer = attnzoo.nn.MultiheadAttention(embed_dim=16, num_heads=2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"embed_dim": 30, "num_heads": 4}, "embed_dim"),
        ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"embed_dim": 32, "num_heads": 0}, "num_heads"),
        ({"embed_dim": 32, "num_heads": 4, "method": "nope"}, "method"),
        ({"embed_dim": 32, "num_heads": 4, "window": 3}, "window"),
        ({"embed_dim": 32, "num_heads": 4, "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_construction(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        attnzoo.nn.MultiheadAttention(**kwargs)


def test_bad_input_shape():
    layer = attnzoo.nn.MultiheadAttention(embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="query"):
        layer(torch.randn(2, 5, 8))
