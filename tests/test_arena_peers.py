"""The arena's peer baselines: exact matches equal attnzoo's methods, approximate ones are sane.

Every peer is skipped with its own ``unavailable()`` reason where it cannot run. Inputs are
``[1, 2, 128, 32]`` throughout so that compiled FlexAttention compiles once.
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.arena.peers import Peer, peers
from attnzoo.methods.performer import cached_projection
from attnzoo.registry import methods

PEERS = {p.name: p for p in peers()}
NAMES = [
    "flex",
    "natten",
    "local-attention",
    "performer-pytorch",
    "nystrom-attention",
    "routing-transformer",
    "reformer-pytorch",
    "fla-naive",
]
# A small setting per peer for the generic checks (its matched method's parameters or its own).
SMALL = {
    "flex": {"window": (15, 0)},
    "natten": {"kernel_size": 15},
    "local-attention": {"window": (15, 0)},
    "performer-pytorch": {"num_features": 64},
    "nystrom-attention": {"num_landmarks": 16},
    "routing-transformer": {"block_size": 32, "top_k": 2},
    "reformer-pytorch": {"bucket_size": 32, "num_hashes": 2},
    "fla-naive": {},
}


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """Overrides the conftest fixture: NaN-filling ``torch.empty`` checks attnzoo's kernels, not the
    peers' code, and it breaks a cold ``torch.compile`` (Inductor's pattern initialisation fills
    ``torch.empty(..., requires_grad=True)`` in place, which autograd refuses)."""
    yield


def usable(name: str) -> Peer:
    peer = PEERS[name]
    reason = peer.unavailable()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return peer


def qkv(n: int = 128, seed: int = 0, scale: float = 1.0, grad: bool = False) -> list[torch.Tensor]:
    """``[1, 2, n, 32]`` queries, keys (both times ``scale``: smaller is a smoother softmax) and values."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for _ in range(3))
    return [t.requires_grad_(grad) for t in (q * scale, k * scale, v)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def run(peer: Peer, q, k, v, causal: bool, params: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention (NATTEN on CPU) warns that it is unfused
        return peer.build(q, k, v, is_causal=causal, params=params)()


# -- the table ----------------------------------------------------------------------------------


def test_every_peer_is_listed_once_with_a_registered_match():
    assert [p.name for p in peers()] == NAMES
    registered = {m.name for m in methods()}
    for peer in peers():
        assert peer.matches is None or peer.matches in registered, peer.name
        assert peer.causal or peer.noncausal, peer.name
        assert peer.settings.endswith(".") and peer.settings.count(". ") == 0, peer.name
    assert {p.name: p.matches for p in peers()} == {
        "flex": "sliding_window",
        "natten": "neighborhood",
        "local-attention": "sliding_window",
        "performer-pytorch": "performer",
        "nystrom-attention": None,
        "routing-transformer": "moba",
        "reformer-pytorch": None,
        "fla-naive": "linear",
    }


def test_an_uninstalled_package_is_reported_not_installed():
    missing = dataclasses.replace(PEERS["nystrom-attention"], package="attnzoo_no_such_peer", requirement="no-such")
    assert missing.unavailable() == "not installed (pip install no-such)"
    with pytest.raises(RuntimeError, match=r"not installed \(pip install no-such\)"):
        missing.build(*qkv(), is_causal=False, params={})


def test_a_broken_import_is_reported_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "attnzoo_broken_peer.py").write_text("raise ImportError('needs CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = dataclasses.replace(PEERS["reformer-pytorch"], package="attnzoo_broken_peer")
    assert broken.unavailable() == "cannot import attnzoo_broken_peer: ImportError: needs CUDA"


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_every_mode_it_claims_and_refuses_the_others(name):
    peer = usable(name)
    q, k, v = qkv(scale=0.5)
    for causal, supported in ((True, peer.causal), (False, peer.noncausal)):
        if supported:
            out = run(peer, q, k, v, causal, SMALL[name])
            assert out.shape == q.shape and out.dtype == q.dtype and out.isfinite().all()
        else:
            with pytest.raises(ValueError, match=f"is_causal={causal}"):
                peer.build(q, k, v, is_causal=causal, params=SMALL[name])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_where_claimed_and_are_refused_elsewhere(name):
    peer = usable(name)
    q, k, v = qkv(grad=True)
    causal = not peer.noncausal
    if not peer.differentiable:
        with pytest.raises(ValueError, match="forward-only"):
            peer.build(q, k, v, is_causal=causal, params=SMALL[name])
        return
    call = peer.build(q, k, v, is_causal=causal, params=SMALL[name])
    for _ in range(2):  # the arena calls it repeatedly: inputs prepared in build must survive that
        call().square().sum().backward()
    used = (q, v) if name == "reformer-pytorch" else (q, k, v)  # reformer shares QK: k is unused
    assert all(t.grad is not None and t.grad.isfinite().all() and t.grad.abs().sum() > 0 for t in used)


# -- exact matches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,error",
    [
        ("natten", {"kernel_size": 65, "dilation": 2}, "kernel_size=65"),
        ("performer-pytorch", {"normalize": False}, "normalize=False"),
        ("flex", {"window": (3, 3), "halo": 1}, "unknown parameter.*'halo'"),
        ("routing-transformer", {"top_k": 0}, "top_k"),
    ],
)
def test_settings_it_cannot_run_are_refused_at_build(name, params, error):
    with pytest.raises(ValueError, match=error):
        usable(name).build(*qkv(), is_causal=False, params=params)


@pytest.mark.parametrize(
    "causal,params",
    [
        (True, {"window": (15, 0)}),
        (False, {"window": (7, 5), "sinks": 2, "dilation": 2}),
        (True, {"window": (None, None)}),  # dense causal
        (False, {"window": (None, None)}),  # dense
    ],
)
def test_flex_equals_sliding_window(causal, params):
    q, k, v = qkv()
    out = run(usable("flex"), q, k, v, causal, params)
    torch.testing.assert_close(out, attnzoo.attention(q, k, v, is_causal=causal, method="sliding_window", **params))
    if params["window"] == (None, None):
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize(
    "causal,params",
    [
        (False, {"kernel_size": 31}),
        (True, {"kernel_size": 15, "dilation": 2}),
        (False, {"kernel_size": 9, "stride": 4}),
    ],
)
def test_natten_equals_neighborhood(causal, params):
    q, k, v = qkv()
    out = run(usable("natten"), q, k, v, causal, params)
    torch.testing.assert_close(out, attnzoo.attention(q, k, v, is_causal=causal, method="neighborhood", **params))


@pytest.mark.parametrize(
    "n,causal,method,params",
    [
        (128, True, "sliding_window", {"window": (15, 0)}),
        (100, True, "sliding_window", {"window": (15, 7)}),  # causal ignores right; 100 is padded to 105
        (128, False, "sliding_window", {"window": (6, 9)}),
        (100, False, "sliding_window", {"window": (20, 20)}),
        (128, False, "sliding_window", {"window": (0, 5)}),
        (128, False, "blocked_local", {"block_size": 16, "halo": 16}),
        (100, True, "blocked_local", {"block_size": 24, "halo": 48}),
        (100, False, "blocked_local", {"block_size": 16, "halo": 0}),
    ],
)
def test_local_attention_equals_sliding_window_and_blocked_local(n, causal, method, params):
    q, k, v = qkv(n, grad=True)
    out = run(usable("local-attention"), q, k, v, causal, params)
    ours = attnzoo.attention(q, k, v, is_causal=causal, method=method, **params)
    torch.testing.assert_close(out, ours)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, expected in zip(grads, torch.autograd.grad(ours.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "params,error",
    [
        ({"window": (15, 0), "sinks": 2}, "sinks=2"),
        ({"window": (15, 0), "dilation": 2}, "dilation=2"),
        ({"window": (None, 0)}, "finite window"),
        ({"block_size": 16, "halo": 8}, "halo=8"),
    ],
)
def test_local_attention_refuses_what_it_cannot_express(params, error):
    with pytest.raises(ValueError, match=error):
        usable("local-attention").build(*qkv(), is_causal=True, params=params)


@pytest.mark.parametrize(
    "params", [{}, {"feature_map": "relu"}, {"feature_map": "identity", "normalize": False}, {"feature_map": "softmax"}]
)
def test_fla_naive_equals_linear(params):
    q, k, v = qkv(grad=True)
    out = run(usable("fla-naive"), q, k, v, True, params)
    ours = attnzoo.attention(q, k, v, is_causal=True, method="linear", **params)
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, expected in zip(grads, torch.autograd.grad(ours.sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_fla_naive_needs_whole_chunks():
    with pytest.raises(ValueError, match="multiple of its chunk size 64"):
        usable("fla-naive").build(*qkv(100), is_causal=True, params={})


# -- approximate peers --------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_performer_with_our_projection_agrees_with_ours(causal):
    q, k, v = qkv(scale=0.5)
    projection = cached_projection(64, 32, 0, torch.float32, torch.device("cpu"))
    out = run(usable("performer-pytorch"), q, k, v, causal, {"projection": projection})
    ours = attnzoo.attention(q, k, v, is_causal=causal, method="performer", projection=projection)
    # Not equal: performer-pytorch adds 1e-4 to every feature (and, causal, leaks future keys).
    assert rel_error(out, ours) < 0.02


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_is_in_the_range_of_ours(causal):
    peer = usable("performer-pytorch")
    q, k, v = qkv(scale=0.5)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    params = [{"num_features": 64, "seed": seed} for seed in range(4)]
    theirs = statistics.mean(rel_error(run(peer, q, k, v, causal, p), exact) for p in params)
    ours = statistics.mean(
        rel_error(attnzoo.attention(q, k, v, is_causal=causal, method="performer", **p), exact) for p in params
    )
    assert 0.05 < ours < 0.6 and ours / 1.5 < theirs < ours * 1.5, (ours, theirs)


def test_performer_pytorch_causal_mode_leaks_the_future_as_its_settings_say():
    peer = usable("performer-pytorch")
    assert "leaks" in peer.settings
    q, k, v = qkv(scale=0.5)
    future = k.clone()
    future[:, :, 64:] *= 5
    past = [run(peer, q, keys, v, True, {"num_features": 64})[:, :, :64] for keys in (k, future)]
    assert (past[0] - past[1]).abs().max() > 1e-3


@pytest.mark.parametrize("params", [{}, {"num_landmarks": 16}])
def test_nystrom_is_close_to_exact_attention(params):
    q, k, v = qkv(scale=0.5)
    out = run(usable("nystrom-attention"), q, k, v, False, params)
    assert out.isfinite().all() and rel_error(out, F.scaled_dot_product_attention(q, k, v)) < 0.5


def test_nystrom_and_reformer_refuse_unknown_options():
    with pytest.raises(ValueError, match=r"unknown parameter.*window"):
        usable("nystrom-attention").build(*qkv(), is_causal=False, params={"window": 3})
    with pytest.raises(ValueError, match="bucket_size=48"):
        usable("reformer-pytorch").build(*qkv(), is_causal=False, params={"bucket_size": 48})


def test_routing_at_full_budget_is_exact_attention():
    q, k, v = qkv()
    out = run(usable("routing-transformer"), q, k, v, False, {"block_size": 64, "top_k": 2})
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_routing_at_half_budget_is_sane(causal):
    q, k, v = qkv()
    out = run(usable("routing-transformer"), q, k, v, causal, {"block_size": 32, "top_k": 2})
    assert out.isfinite().all() and rel_error(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal)) < 1


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_is_close_to_shared_qk_attention(causal):
    q, _, v = qkv(scale=0.5)
    torch.manual_seed(0)  # it draws its hash rotations from the global generator on every call
    out = run(usable("reformer-pytorch"), q, q, v, causal, {})
    exact = F.scaled_dot_product_attention(q, F.normalize(q, dim=-1), v, is_causal=causal)  # keys: unit queries
    assert out.shape == q.shape and out.isfinite().all() and rel_error(out, exact) < 1
