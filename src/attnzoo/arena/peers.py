"""Peer libraries the speed suite times beside attnzoo (the optional ``peers`` extra).

Each :class:`Peer` says which attnzoo method it is compared with (``matches``), what it supports,
why it cannot run here (:meth:`Peer.unavailable`: not installed, broken import, no C++ compiler)
and how the matched method's parameters become the peer's own arguments (:meth:`Peer.build`,
summarised in ``settings`` for the report). Inputs and outputs are attnzoo's ``[B, H, N, D]``;
a peer that needs another layout gets its inputs converted once in ``build`` and only its output
converted back in the timed call. ``tests/test_arena_peers.py`` checks every exact match::

    peer = next(p for p in peers() if p.name == "flex")
    if peer.unavailable() is None:
        run = peer.build(q, k, v, is_causal=True, params={"window": (255, 0)})
        out = run()  # [B, H, N, D]; the first call compiles
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.features import feature_map
from ..methods._spatial import per_axis
from ..params import MethodParams
from ..registry import get_method

Run = Callable[[], Tensor]
Builder = Callable[[Tensor, Tensor, Tensor, bool, dict[str, Any]], Run]


@dataclass(frozen=True)
class Peer:
    """A peer library's attention, runnable on attnzoo-layout inputs with matched settings.

    ``package`` is the module imported to run it, ``requirement`` its pip name, ``matches`` the
    attnzoo method it is compared with (``None``: compared with SDPA only), ``causal``/``noncausal``
    the modes it has, ``differentiable`` whether its output has gradients on CPU, ``settings`` one
    sentence on how the parameters are matched, ``exact`` whether it computes exactly what the
    matched method computes (the arena then checks it against that method's float64 reference).
    """

    name: str
    package: str
    requirement: str
    matches: str | None
    causal: bool
    noncausal: bool
    differentiable: bool
    settings: str
    builder: Builder = field(repr=False)
    probe: Callable[[], str | None] | None = field(default=None, repr=False)
    exact: bool = False

    def unavailable(self) -> str | None:
        """``None`` when the peer can run here, else why not (``"not installed (pip install X)"``,
        a broken import, a missing compiler)."""
        key = (self.package, self.requirement, self.probe)
        if key not in _PROBLEMS:
            problem = _import_problem(self.package, self.requirement)
            _PROBLEMS[key] = problem if problem is not None or self.probe is None else self.probe()
        return _PROBLEMS[key]

    def build(self, q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, params: dict[str, Any]) -> Run:
        """Prepare the peer on ``q``/``k``/``v`` (``[B, H, N, D]``) with the parameters ``params`` of
        the matched attnzoo method (or the peer's own options when ``matches`` is None) and return a
        zero-argument callable computing its output ``[B, H, N, D]``. Raises ``ValueError`` naming the
        parameter when a setting has no equivalent in the peer, ``RuntimeError`` when it cannot run."""
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(f"peer {self.name!r} cannot run: {reason}")
        if is_causal and not self.causal:
            raise ValueError(f"is_causal=True: peer {self.name!r} has no causal mode; pass is_causal=False")
        if not is_causal and not self.noncausal:
            raise ValueError(f"is_causal=False: peer {self.name!r} is causal only; pass is_causal=True")
        if not self.differentiable and q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                f"q, k, v: peer {self.name!r} is forward-only on CPU (its backward raises); "
                "pass tensors that do not require grad"
            )
        return self.builder(q, k, v, is_causal, dict(params))


_PROBLEMS: dict[tuple[str, str, Callable[[], str | None] | None], str | None] = {}


def _import_problem(package: str, requirement: str) -> str | None:
    if importlib.util.find_spec(package.split(".")[0]) is None:
        return f"not installed (pip install {requirement})"
    try:
        with _quiet():
            importlib.import_module(package)
    except Exception as error:  # a broken install surfaces as any exception at import
        return f"cannot import {package}: {type(error).__name__}: {error}"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation warnings and prints of unmaintained peers (import and construction)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Peers draw their random tensors from torch's global generator: seed it without leaking."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _method_params(method: str, params: dict[str, Any]) -> Any:
    return get_method(method).params.from_kwargs(method, params)


def _unsupported(p: MethodParams, peer: str, reasons: dict[str, str]) -> None:
    """Refuse parameters that differ from their default when the peer cannot express them."""
    defaults = type(p)()
    for name, reason in reasons.items():
        if getattr(p, name) != getattr(defaults, name):
            raise ValueError(f"{name}={getattr(p, name)!r}: {peer} cannot match it ({reason})")


def _options(peer: str, params: dict[str, Any], defaults: dict[str, int]) -> dict[str, int]:
    """The options of a peer without an attnzoo method: ``params`` over ``defaults``, checked."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for peer {peer!r}; valid (with defaults): {defaults}")
    merged = {**defaults, **params}
    for name, value in merged.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 for peer {peer!r}, got {value!r}")
    return merged


def _self_attention(q: Tensor, k: Tensor, v: Tensor, peer: str) -> tuple[int, int, int, int]:
    """Check ``[B, H, N, D]`` inputs of one shape (no cross attention, no GQA) and return the shape."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D] (4 dims) for peer {peer!r}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {tuple(q.shape)} for peer {peer!r} (self-attention, equal "
                f"heads), got {tuple(t.shape)}"
            )
    batch, heads, n, dim = q.shape
    return batch, heads, n, dim


_PEERS: list[Peer] = []


def _peer(
    name: str,
    package: str,
    requirement: str,
    matches: str | None,
    *,
    causal: bool = True,
    noncausal: bool = True,
    differentiable: bool = True,
    probe: Callable[[], str | None] | None = None,
    exact: bool = False,
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as a peer; its docstring is the peer's ``settings`` sentence."""

    def register(builder: Builder) -> Builder:
        settings = " ".join((builder.__doc__ or "").split())
        _PEERS.append(
            Peer(
                name, package, requirement, matches, causal, noncausal, differentiable, settings, builder, probe, exact
            )
        )
        return builder

    return register


# -- compiled FlexAttention ---------------------------------------------------------------------

_FLEX: dict[str, Callable[..., Tensor]] = {}


def _compiled_flex() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)`` once per process; static shapes, so every N gets its kernel."""
    if "compiled" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


def _flex_probe() -> str | None:
    try:  # private helpers: if they move, let the first call report the problem instead
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except ImportError:
        return None
    if not check_cpu_supported():
        return "compiled FlexAttention on CPU needs x86 with AVX2 (and not macOS)"
    try:
        get_cpp_compiler()
    except Exception as error:
        return f"torch.compile needs a C++ compiler: {type(error).__name__}: {error}"
    return None


@_peer(
    "flex",
    "torch.nn.attention.flex_attention",
    "torch>=2.5",
    "sliding_window",
    differentiable=False,
    probe=_flex_probe,
    exact=True,
)
def _build_flex(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """torch.compile(flex_attention) with a BlockMask built from sliding_window's own band (window, sinks,
    dilation, bottom-right aligned; window=(None, None) is dense or dense causal); CPU inference only."""
    from torch.nn.attention.flex_attention import create_block_mask

    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, H, N, D] with k and v alike, got {q.shape}, {k.shape}, {v.shape}")
    p = _method_params("sliding_window", params)
    nq, nk = q.shape[-2], k.shape[-2]
    unbounded = nq + nk
    left = unbounded if p.window[0] is None else p.window[0]
    right = 0 if is_causal else (unbounded if p.window[1] is None else p.window[1])
    # Tensors, not Python ints, in the mask_mod: one compiled kernel serves every window setting.
    bounds = torch.tensor(
        [left * p.dilation, right * p.dilation, p.dilation, p.sinks, nk - nq, int(is_causal)], device=q.device
    )

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        i = q_idx + bounds[4]  # bottom-right aligned position of the query
        band = (kv_idx >= i - bounds[0]) & (kv_idx <= i + bounds[1]) & ((i - kv_idx) % bounds[2] == 0)
        sink = (kv_idx < bounds[3]) & ((kv_idx <= i) | (bounds[5] == 0))
        return band | sink

    block_mask = create_block_mask(mask_mod, None, None, nq, nk, device=q.device)
    flex, gqa = _compiled_flex(), q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


# -- NATTEN -------------------------------------------------------------------------------------


@_peer("natten", "natten", "natten", "neighborhood", differentiable=False, exact=True)
def _build_natten(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """natten.na1d/na2d/na3d with the same kernel_size, stride, dilation and per-axis causality
    (heads-last layout prepared once); on CPU NATTEN runs eager FlexAttention, forward only."""
    import natten

    spatial = q.dim() - 3
    if spatial not in (1, 2, 3) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, *spatial (1-3 dims), D], got {q.shape}")
    p = _method_params("neighborhood", params)
    reach = zip(per_axis(p.kernel_size, spatial, "kernel_size"), per_axis(p.dilation, spatial, "dilation"))
    for axis, (size, (kernel, dilation)) in enumerate(zip(q.shape[2:-1], reach)):
        if kernel * dilation > size:
            raise ValueError(
                f"kernel_size={p.kernel_size!r}: kernel * dilation exceeds the extent {size} of axis {axis}"
            )
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[spatial]
    causal = p.causal_dims if p.causal_dims is not None else is_causal
    options = {"kernel_size": p.kernel_size, "stride": p.stride, "dilation": p.dilation, "is_causal": causal}
    heads_last = [t.movedim(1, -2).contiguous() for t in (q, k, v)]  # NATTEN: [B, *spatial, H, D]
    return lambda: na(*heads_last, **options).movedim(-2, 1)


# -- lucidrains ---------------------------------------------------------------------------------


@_peer("local-attention", "local_attention", "local-attention", "sliding_window", exact=True)
def _build_local(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """LocalAttention(exact_windowsize=True) with window_size = gcd(left, right) and look_backward/forward
    = left/right over it (the same band); blocked_local params (halo a multiple of block_size) map to its
    default blocked mode."""
    from local_attention import LocalAttention

    batch, _, n, _ = _self_attention(q, k, v, "local-attention")
    if "block_size" in params or "halo" in params:
        p = _method_params("blocked_local", params)
        if not isinstance(p.block_size, int) or not isinstance(p.halo, int) or p.halo % p.block_size:
            raise ValueError(
                f"halo={p.halo!r}: local-attention looks around whole windows, so it needs an int halo that is "
                f"a multiple of the int block_size={p.block_size!r}"
            )
        window, back, exact = p.block_size, p.halo // p.block_size, False
        forward = 0 if is_causal else back
    else:
        p = _method_params("sliding_window", params)
        _unsupported(p, "local-attention", {"sinks": "no attention sinks", "dilation": "no dilation"})
        left, right = p.window
        if left is None or (right is None and not is_causal):
            raise ValueError(f"window={p.window!r}: local-attention needs a finite window on both sides")
        right = 0 if is_causal else right
        if left < 1 and (is_causal or right < 1):
            raise ValueError(f"window={p.window!r}: local-attention needs at least one key besides the query's own")
        # The band [i - left, i + right] is look_backward/look_forward whole windows of gcd(left, right).
        window = math.gcd(left, right)
        back, forward, exact = left // window, right // window, True
    module = LocalAttention(
        window_size=window,
        causal=is_causal,
        look_backward=back,
        look_forward=forward,
        exact_windowsize=exact,
        autopad=n % window != 0,
    )
    # Padding to whole windows adds zero keys; only the key mask hides them from non-causal queries.
    mask = torch.ones(batch, n, dtype=torch.bool, device=q.device) if n % window else None
    return lambda: module(q, k, v, mask=mask)


@_peer("performer-pytorch", "performer_pytorch", "performer-pytorch", "performer")
def _build_performer(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """FastAttention with nb_features = num_features and its own orthogonal features drawn under seed (or
    our projection copied in); its causal mode leaks future keys through a sequence-wide maximum."""
    from performer_pytorch import FastAttention

    _, _, _, dim = _self_attention(q, k, v, "performer-pytorch")
    p = _method_params("performer", params)
    _unsupported(
        p,
        "performer-pytorch",
        {"normalize": "its FastAttention always normalises", "initial_state": "no recurrent state input"},
    )
    features = p.num_features if p.projection is None else p.projection.shape[0]
    with _seeded(p.seed), _quiet():
        module = FastAttention(dim_heads=dim, nb_features=features, causal=is_causal).to(q.device)
    if p.projection is not None:
        if tuple(p.projection.shape) != (features, dim):
            raise ValueError(f"projection must be [num_features, D={dim}], got {tuple(p.projection.shape)}")
        module.projection_matrix.copy_(p.projection)
    return lambda: module(q, k, v)


@_peer("nystrom-attention", "nystrom_attention", "nystrom-attention", None, causal=False)
def _build_nystrom(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """NystromAttention core on our q, k, v (projections and conv residual removed), its defaults
    num_landmarks=256 (at most N) and pinv_iterations=6; compared with SDPA."""
    from nystrom_attention import NystromAttention

    batch, heads, n, dim = _self_attention(q, k, v, "nystrom-attention")
    options = _options("nystrom-attention", params, {"num_landmarks": 256, "pinv_iterations": 6})
    landmarks = min(options["num_landmarks"], n)
    module = NystromAttention(
        dim=heads * dim,
        dim_head=dim,
        heads=heads,
        num_landmarks=landmarks,
        pinv_iterations=options["pinv_iterations"],
        residual=False,
    )
    # Its projections are replaced by identities so it attends our q, k, v: x holds them side by side.
    module.to_qkv, module.to_out = nn.Identity(), nn.Identity()
    x = torch.cat([t.transpose(1, 2).reshape(batch, n, heads * dim) for t in (q, k, v)], dim=-1)  # (B, N, 3HD)
    # It front-pads N to a multiple of the landmarks with zero tokens; the mask keeps them out.
    mask = torch.ones(batch, n, dtype=torch.bool, device=q.device) if n % landmarks else None
    return lambda: module(x, mask=mask).reshape(batch, n, heads, dim).transpose(1, 2)


@_peer("routing-transformer", "routing_transformer", "routing-transformer", "moba")
def _build_routing(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """KmeansAttention with window_size = block_size * top_k keys per cluster (the keys a moba query
    attends) and ceil(N / window_size) clusters, k-means initialised on the inputs, not updated."""
    from routing_transformer.routing_transformer import KmeansAttention

    _, heads, n, dim = _self_attention(q, k, v, "routing-transformer")
    p = _method_params("moba", params)
    window = min(n, p.block_size * p.top_k)  # keys per cluster = keys a moba query attends
    clusters = -(-n // window)
    with _seeded(0):
        module = KmeansAttention(clusters, window, heads, dim, causal=is_causal).to(q.device).eval()
        module.kmeans.init(torch.cat((q, k), dim=2).detach())  # its lazy k-means initialisation, done here
    with torch.no_grad():
        # Causal mode adds a learned memory key/value per cluster; untrained, it is a null slot.
        module.mem_key.zero_()
        module.mem_value.zero_()
    return lambda: module(q, k, v)[0]


@_peer("reformer-pytorch", "reformer_pytorch", "reformer-pytorch", None)
def _build_reformer(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """LSHAttention with its defaults bucket_size=64 and n_hashes=8 (num_hashes), shared query-key: the
    queries serve as keys, k is not used; compared with SDPA."""
    from reformer_pytorch.reformer_pytorch import LSHAttention

    batch, heads, n, dim = _self_attention(q, k, v, "reformer-pytorch")
    options = _options("reformer-pytorch", params, {"bucket_size": 64, "num_hashes": 8})
    if n % (2 * options["bucket_size"]):
        raise ValueError(
            f"bucket_size={options['bucket_size']}: reformer-pytorch needs N={n} to be a multiple of "
            "2 * bucket_size; choose another bucket_size or N"
        )
    module = LSHAttention(bucket_size=options["bucket_size"], n_hashes=options["num_hashes"], causal=is_causal).eval()
    qk, values = q.reshape(batch * heads, n, dim), v.reshape(batch * heads, n, dim)  # shared QK: k is not used
    return lambda: module(qk, values)[0].reshape(batch, heads, n, dim)


# -- flash-linear-attention ---------------------------------------------------------------------


@_peer("fla-naive", "fla.ops.linear_attn.naive", "fla-core", "linear", noncausal=False, exact=True)
def _build_fla(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, params: dict[str, Any]) -> Run:
    """flash-linear-attention's naive_chunk_linear_attn on the same feature map (applied in the call) and
    normalize flag as linear; N must be a multiple of its chunk size 64."""
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn

    _, _, n, _ = _self_attention(q, k, v, "fla-naive")
    p = _method_params("linear", params)
    _unsupported(p, "fla-naive", {"initial_state": "naive_chunk_linear_attn takes no initial state"})
    if n % 64:
        raise ValueError(f"q: fla's naive_chunk_linear_attn needs N a multiple of its chunk size 64, got N={n}")
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla: [B, N, H, D]
    name, normalize = p.feature_map, p.normalize
    return lambda: naive_chunk_linear_attn(
        feature_map(name, qt), feature_map(name, kt), vt, normalize=normalize
    ).transpose(1, 2)


def peers() -> list[Peer]:
    """Every peer the speed suite knows, installed or not (check :meth:`Peer.unavailable`)."""
    return list(_PEERS)


__all__ = ["Peer", "peers"]
