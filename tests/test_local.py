"""Local attention: semantics against first-principles definitions, the other libraries'
conventions, NATTEN (where installed), bad inputs, and the tile kernel's structure."""

import importlib.util

import pytest
import torch

import attnzoo
import attnzoo.api
from attnzoo import conventions
from attnzoo.api import prepare
from attnzoo.methods._spatial import spatial_layout
from attnzoo.methods.neighborhood import _intervals as neighborhood_intervals
from attnzoo.methods.sliding_window import layout as sliding_layout
from attnzoo.methods.sliding_window import window_visibility

LOCAL = ("sliding_window", "neighborhood", "blocked_local", "window")


def visibility(method, shape, **kwargs):
    """The pattern as a bool [N, N] matrix, read off the method through its output: with
    values = one-hot positions and equal scores, output row i is uniform over what i sees."""
    n = int(torch.tensor(shape).prod())
    q = torch.zeros(1, 1, *shape, n, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).reshape(1, 1, *shape, n)
    out = attnzoo.attention(q, q, v, method=method, **kwargs).reshape(n, n)
    return out > 0


def test_sliding_window_counts_left_plus_right_plus_one():
    seen = visibility("sliding_window", (50,), window=(4, 2))
    assert seen[20].sum() == 7 and seen[20, 16:23].all()
    assert seen[0].sum() == 3 and seen[49].sum() == 5  # truncated at the borders, never shifted


def test_sliding_window_cross_is_bottom_right_aligned():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 10, 8, dtype=torch.float64)
    _, call, params = prepare(q, k, k, is_causal=True, method="sliding_window", window=(2, 0))
    mask = window_visibility(call, params)
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6]  # query 0 aligns to key 6 = 0 + 10 - 4
    assert mask[3].nonzero().flatten().tolist() == [7, 8, 9]


def test_sinks_are_visible_to_every_query_and_not_counted_twice():
    seen = visibility("sliding_window", (40,), window=(3, 0), sinks=2, is_causal=True)
    assert seen[30].nonzero().flatten().tolist() == [0, 1, 27, 28, 29, 30]
    assert seen[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert seen[0].nonzero().flatten().tolist() == [0]  # causality still holds for sinks


def test_dilated_window_takes_every_dth_key():
    seen = visibility("sliding_window", (40,), window=(2, 1), dilation=3)
    assert seen[20].nonzero().flatten().tolist() == [14, 17, 20, 23]


@pytest.mark.parametrize("kernel", [3, 4, 5])
def test_neighborhood_has_exactly_k_neighbours_shifted_at_borders(kernel):
    seen = visibility("neighborhood", (11,), kernel_size=kernel)
    assert (seen.sum(1) == kernel).all()
    assert seen[0, :kernel].all()  # the border window shifts inward instead of shrinking
    if kernel == 4:  # even kernels: K // 2 before, self, K // 2 - 1 after (NATTEN >= 0.17.5)
        assert seen[5].nonzero().flatten().tolist() == [3, 4, 5, 6]


def test_neighborhood_2d_is_the_product_of_axes():
    seen = visibility("neighborhood", (6, 7), kernel_size=(3, 5))
    assert (seen.sum(1) == 15).all()
    row = seen.reshape(6, 7, 6, 7)[0, 0]
    assert row[:3, :5].all() and row.sum() == 15


def test_neighborhood_causal_and_stride():
    seen = visibility("neighborhood", (12,), kernel_size=3, is_causal=True)
    assert seen[6].nonzero().flatten().tolist() == [4, 5, 6]
    assert seen[1].nonzero().flatten().tolist() == [0, 1]
    # stride 3: queries 3, 4, 5 share the window centred on their leader, query 4
    strided = visibility("neighborhood", (12,), kernel_size=3, stride=3)
    assert all(strided[i].nonzero().flatten().tolist() == [3, 4, 5] for i in (3, 4, 5))


def test_causal_dims_per_axis():
    seen = visibility("neighborhood", (5, 5), kernel_size=3, causal_dims=(True, False)).reshape(5, 5, 5, 5)
    visible = seen[2, 2].nonzero().tolist()
    assert visible == [[r, c] for r in (0, 1, 2) for c in (1, 2, 3)]


def test_blocked_local_block_plus_halo():
    seen = visibility("blocked_local", (20,), block_size=4, halo=2)
    for query in range(8, 12):  # block [8, 12) sees [6, 14)
        assert seen[query].nonzero().flatten().tolist() == list(range(6, 14))


def test_window_shift_matches_swin_regions():
    seen = visibility("window", (8,), window_size=4, shift=2)
    # rolled windows {2,3,4,5} and {6,7,0,1}; the second is split by Swin's mask into {6,7} and {0,1}
    assert seen[3].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert seen[7].nonzero().flatten().tolist() == [6, 7]
    assert seen[0].nonzero().flatten().tolist() == [0, 1]


def _band(n, predicate):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return predicate(i, j)


@pytest.mark.parametrize(
    "kwargs,definition",
    [
        (conventions.from_flash_attn((3, 2)), lambda i, j: (j >= i - 3) & (j <= i + 2)),
        (conventions.from_flash_attn((-1, 0), causal=True), lambda i, j: j <= i),
        (conventions.from_xformers_local(2, 5), lambda i, j: (i - 2 <= j) & (j <= i + 5)),
        (conventions.from_xformers_causal_local(4), lambda i, j: (i - 4 < j) & (j <= i)),
        (conventions.from_attention_gym(4), lambda i, j: (i - j >= 0) & (i - j <= 4)),
        (conventions.from_local_attention(4), lambda i, j: (i - j >= 0) & (i - j <= 4)),
    ],
)
def test_converters_reproduce_the_other_libraries_masks(kwargs, definition):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    assert torch.equal(visibility(method, (30,), **kwargs), _band(30, definition))


def test_converters_refuse_what_has_no_equivalent():
    with pytest.raises(ValueError, match="exact_windowsize"):
        conventions.from_local_attention(4, exact_windowsize=False)
    with pytest.raises(ValueError, match="window_size"):
        conventions.from_flash_attn((-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        conventions.from_xformers_causal_local(0)


BAD = [
    ("sliding_window", (16,), {"window": (-1, 0)}, "window"),
    ("sliding_window", (16,), {"sinks": -1}, "sinks"),
    ("sliding_window", (16,), {"dilation": 0}, "dilation"),
    ("neighborhood", (6, 6), {"kernel_size": 7}, "kernel_size"),
    ("neighborhood", (6, 6), {"kernel_size": 3, "dilation": 3}, "dilation"),
    ("neighborhood", (6, 6), {"kernel_size": 0}, "kernel_size"),
    ("neighborhood", (6, 6), {"kernel_size": (3, 3, 3)}, "kernel_size"),
    ("neighborhood", (6, 6), {"kernel_size": 3, "stride": 4}, "stride"),
    ("neighborhood", (6, 6), {"kernel_size": 3, "dilation": (1, 1, 1)}, "dilation"),
    ("neighborhood", (6, 6), {"kernel_size": 3, "causal_dims": (True,)}, "causal_dims"),
    ("neighborhood", (6, 6), {"kernel_size": 3, "causal_dims": (True, False), "is_causal": True}, "causal_dims"),
    ("blocked_local", (6, 6), {"block_size": 7}, "block_size"),
    ("blocked_local", (6, 6), {"block_size": 0}, "block_size"),
    ("blocked_local", (6, 6), {"halo": -1}, "halo"),
    ("blocked_local", (6, 6), {"block_size": 3, "halo": (1, 1, 1)}, "halo"),
    ("window", (6, 6), {"window_size": 7}, "window_size"),
    ("window", (6, 6), {"window_size": 3, "shift": 3}, "shift"),
    ("window", (6, 6), {"window_size": (3,)}, "window_size"),
    ("window", (6, 6), {"is_causal": True}, "is_causal"),
    ("neighborhood", (2, 3, 4, 5), {"kernel_size": 2}, "query"),  # four spatial dims
]


@pytest.mark.parametrize(
    "method,shape,kwargs,argument", BAD, ids=[f"{m}-{a}-{i}" for i, (m, _, _, a) in enumerate(BAD)]
)
def test_bad_parameters_are_refused_before_computation(method, shape, kwargs, argument, monkeypatch):
    ran = []
    monkeypatch.setattr(attnzoo.api, "_execute", lambda *a: ran.append(a))
    q = torch.randn(1, 2, *shape, 8)
    with pytest.raises(ValueError) as info:
        attnzoo.attention(q, q, q, method=method, **kwargs)
    assert argument in str(info.value), str(info.value)
    assert not ran


def test_sliding_window_layout_is_linear_and_uses_views():
    q = torch.zeros(1, 1, 65536, 8)
    _, call, params = prepare(q, q, q, is_causal=True, method="sliding_window", window=(255, 0))
    layout = sliding_layout(call, params)
    assert layout.q_index.numel() == 65536 and layout.span == 64 + 255
    assert layout.masks.shape[0] <= 8  # interior tiles share one mask
    assert layout.visible_pairs() == sum(min(i + 1, 256) for i in range(65536))
    interior = max(layout.runs, key=lambda r: r.t1 - r.t0)
    assert interior.k_start is not None and interior.t1 - interior.t0 > 1000  # strided views, no gathers


def test_neighborhood_interior_tiles_share_a_mask():
    q = torch.zeros(1, 1, 64, 64, 8)
    _, call, params = prepare(q, q, q, method="neighborhood", kernel_size=13)
    axis, tile = neighborhood_intervals(64, 0, call, params)
    assert tile == 4 and (axis.hi - axis.lo + 1 == 13).all()
    layout = spatial_layout(call, params, neighborhood_intervals)
    assert layout.masks.shape[0] == 15 and layout.span == 16 * 20 and layout.key_source.numel() < 3 * 64 * 64


@pytest.mark.parametrize(
    "method,kwargs", [("sliding_window", {"window": (7, 0)}), ("neighborhood", {"kernel_size": 3})]
)
def test_trains_in_low_precision(method, kwargs):
    shape = (40,) if method == "sliding_window" else (6, 7)
    q, k, v = (torch.randn(2, 4, *shape, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attnzoo.attention(q, k, v, is_causal=True, method=method, **kwargs)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed (optional peer)")
@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((16,), {"kernel_size": 5}),
        ((17,), {"kernel_size": 6, "dilation": 2, "stride": 3, "is_causal": True}),
        ((9, 11), {"kernel_size": (3, 5), "stride": (2, 3)}),
        ((12, 10), {"kernel_size": (4, 3), "dilation": (2, 3), "is_causal": (True, False)}),
        ((6, 7, 8), {"kernel_size": (3, 2, 5), "stride": (1, 2, 3), "dilation": (2, 1, 1)}),
    ],
)
def test_neighborhood_equals_natten(shape, kwargs):
    import natten

    q, k, v = (torch.randn(1, 2, *shape, 32) for _ in range(3))
    ours_kwargs = dict(kwargs)
    causal = ours_kwargs.pop("is_causal", False)
    if isinstance(causal, tuple):
        ours_kwargs["causal_dims"], causal = causal, False
    ours = attnzoo.attention(q, k, v, method="neighborhood", is_causal=causal, **ours_kwargs)
    heads_last = [t.movedim(1, -2).contiguous() for t in (q, k, v)]  # NATTEN: [B, *spatial, H, D]
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    theirs = na(*heads_last, **kwargs).movedim(-2, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_every_local_method_is_registered_as_local():
    assert {m.name for m in attnzoo.methods("local")} == set(LOCAL)


@pytest.mark.parametrize(
    "method,shape,kwargs",
    [
        ("neighborhood", (6, 7), {"kernel_size": (3, 4), "stride": (1, 2)}),
        ("neighborhood", (4, 6, 5), {"kernel_size": 3, "dilation": (1, 2, 1)}),
        ("blocked_local", (7, 8), {"block_size": 3, "halo": 2}),
    ],
)
def test_spatial_causality_never_looks_ahead_on_any_axis(method, shape, kwargs):
    seen = visibility(method, shape, is_causal=True, **kwargs)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    ahead = (coords[None, :, :] > coords[:, None, :]).any(-1)  # key ahead of the query along some axis
    assert not (seen & ahead).any()
    assert seen.diagonal().all()  # every query sees itself
