"""The speed and memory suite: forward and forward+backward time and extra peak memory per call.

One cell is one method (or SDPA, or a peer library) at one sequence length and pass. Within a
cell the method, SDPA at the same shape and a reference matrix multiply are timed interleaved
(round-robin, order reversed every other round) after a warm-up, so the ratio to SDPA and the
fraction of the machine's matmul rate come from one run; the first call is timed apart (it holds
compilation, allocator warm-up and caches). Before anything is timed the method's output is
checked against its float64 reference (at ``min(N, check_n)`` tokens, same parameters): a wrong
method is stored as ``"wrong"`` and never timed.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import stats
from ..api import attention
from ..errors import NoBackendError
from ..registry import Method, get_method
from .common import (
    FWDBWD_FACTOR,
    describe_params,
    forward_flops,
    inference,
    measured_mode,
    requires_grad_inputs,
    run_params,
    training_step,
)
from .store import Cell
from .timing import interleaved, peak_extra_bytes

SUITE = "speed"
SDPA = "sdpa"
PEER_PREFIX = "peer:"
MATMUL_N = 512
# A peer that computes exactly what its matched method computes must agree with that method's
# float64 reference to float32 rounding (relative to max(1, max|gold|)).
PEER_BOUND = 1e-4


@dataclass(frozen=True)
class SpeedConfig:
    """Shapes and repetitions of the speed suite (``B``, ``H``, ``D``, the sizes ``N``)."""

    sizes: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    batch: int = 1
    heads: int = 8
    dim: int = 64
    rounds: int = 9
    keys: int = 256
    check_n: int = 1024
    all_backends: bool = True
    max_call_s: float = 30.0
    seed: int = 0


QUICK = SpeedConfig(sizes=(512, 1024, 2048), heads=4, rounds=3, check_n=512, all_backends=False, max_call_s=0.5)


class TooSlow(Exception):
    """A call slower than ``SpeedConfig.max_call_s``: the cell keeps its first-call time only."""


# Calls already found too slow, per (method, variant, mode, pass): larger N are not attempted.
_TOO_SLOW: dict[tuple, tuple[int, float]] = {}
# SDPA's extra peak memory per (N, causal, pass), measured once.
_SDPA_PEAKS: dict[tuple, int] = {}
# First-call times measured while checking a peer (compilation happens there), per shape.
_FIRST_CALLS: dict[tuple, float] = {}


def _shape(config: SpeedConfig, n: int, causal: bool, pass_: str) -> dict[str, Any]:
    return {"B": config.batch, "H": config.heads, "N": n, "D": config.dim, "causal": causal, "pass": pass_}


def _keys(spec: Method, config: SpeedConfig) -> int | None:
    return config.keys if spec.budget is not None else None


def plan(methods: list[Method], config: SpeedConfig, threads: int, with_peers: bool = True) -> list[Cell]:
    """Every cell of the suite: SDPA (causal and non-causal), each method in its measured mode
    (causal when supported) with its backends (or its first one), and the peers matching the
    selected methods; for each size and pass (inference methods: forward only)."""
    cells = []
    selected = {m.name for m in methods}
    for n in config.sizes:
        for pass_ in ("fwd", "fwdbwd"):
            for causal in (True, False):
                cells.append(Cell(SUITE, SDPA, "default", {}, _shape(config, n, causal, pass_), "float32", threads))
            for spec in methods:
                if pass_ == "fwdbwd" and not spec.capabilities.differentiable:
                    continue
                causal = measured_mode(spec, prefer_causal=True)
                backends = spec.backend_names if config.all_backends else spec.backend_names[:1]
                params = {"keys": _keys(spec, config)}
                for backend in backends:
                    cells.append(
                        Cell(SUITE, spec.name, backend, params, _shape(config, n, causal, pass_), threads=threads)
                    )
            if not with_peers:
                continue
            from .peers import peers

            for peer in peers():
                if peer.matches is not None and peer.matches not in selected:
                    continue
                if pass_ == "fwdbwd" and not peer.differentiable:
                    continue
                causal = peer.causal if peer.matches is None else measured_mode(get_method(peer.matches), True)
                if (causal and not peer.causal) or (not causal and not peer.noncausal):
                    causal = not causal
                params = {"keys": config.keys if peer.matches and get_method(peer.matches).budget else None}
                shape = _shape(config, n, causal, pass_)
                cells.append(Cell(SUITE, PEER_PREFIX + peer.name, "default", params, shape, threads=threads))
    return cells


def estimate_bytes(cell: Cell, config: SpeedConfig) -> int:
    """A generous estimate of the cell's peak memory: inputs (and their gradients), a tiled
    working set, and the float64 check at ``check_n`` tokens."""
    s = cell.shape
    per_tensor = s["B"] * s["H"] * s["N"] * s["D"] * 4
    inputs = per_tensor * (10 if s["pass"] == "fwdbwd" else 5)
    working = s["B"] * s["H"] * s["N"] * min(s["N"], 1024) * 4 * 4
    check_n = min(s["N"], config.check_n)
    check = s["B"] * s["H"] * check_n * check_n * 8 * 4
    return inputs + working + check


def _inputs(config: SpeedConfig, n: int, seed: int, dtype: torch.dtype, spec: Method | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (config.batch, config.heads, n, config.dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    if spec is not None and spec.shared_query:
        q = q[:, :, :1].expand_as(q).contiguous()
    return [q, k, v]


def _cast(params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {n: (p.to(dtype) if isinstance(p, torch.Tensor) and p.is_floating_point() else p) for n, p in params.items()}


_CHECKS: dict[tuple, tuple[float, float]] = {}


def check_error(spec: Method, backend: str, causal: bool, config: SpeedConfig, n: int) -> tuple[float, float]:
    """``(error, bound)``: the backend's max error against the float64 reference at
    ``min(n, check_n)`` tokens, relative to ``max(1, max|gold|)``; the bound is the larger of 1e-5
    and four times the error of the reference itself run in float32 (cached per configuration)."""
    n = min(n, config.check_n)
    key = (spec.name, backend, causal, n, config.batch, config.heads, config.dim, config.keys)
    if key in _CHECKS:
        return _CHECKS[key]
    q, k, v = _inputs(config, n, config.seed + 1, torch.float64, spec)
    params = run_params(spec, q, k, v, causal, _keys(spec, config), config.seed)
    gold = attention(q, k, v, is_causal=causal, method=spec.name, backend="reference", **params)
    low = [t.float() for t in (q, k, v)]
    low_params = _cast(params, torch.float32)
    reference = attention(*low, is_causal=causal, method=spec.name, backend="reference", **low_params)
    fast = attention(*low, is_causal=causal, method=spec.name, backend=backend, **low_params)
    scale = max(1.0, gold.abs().max().item())
    err = (fast.double() - gold).abs().max().item() / scale
    if not math.isfinite(err):
        err = math.inf
    bound = max(1e-5, 4 * (reference.double() - gold).abs().max().item() / scale)
    _CHECKS[key] = (err, bound)
    return err, bound


def _slow_key(cell: Cell) -> tuple:
    return (cell.method, cell.variant, cell.shape["causal"], cell.shape["pass"])


def _time_cell(cell: Cell, config: SpeedConfig, compute, leaves, sdpa_compute, sdpa_leaves) -> dict[str, Any]:
    if cell.shape["pass"] == "fwd":
        fn, sdpa_fn = inference(compute), inference(sdpa_compute)
    else:
        fn, sdpa_fn = training_step(compute, leaves), training_step(sdpa_compute, sdpa_leaves)
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    # A slow first call may be compilation: only a slow second call counts.
    again = first
    if first > config.max_call_s:
        start = time.perf_counter()
        fn()
        again = time.perf_counter() - start
    if again > config.max_call_s:
        _TOO_SLOW[_slow_key(cell)] = (cell.shape["N"], again)
        raise TooSlow(f"one call took {again:.2f} s, over the {config.max_call_s} s per call of these settings")
    first = max(first, _FIRST_CALLS.pop((cell.method, cell.shape["N"], cell.shape["causal"]), 0.0))
    rounds = config.rounds
    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    # Calls that take seconds get fewer rounds (at least 3), so one cell stays under a minute.
    rounds = max(3, min(rounds, int(20 / max(first, 1e-3))))
    # The method is warm from its first call; SDPA and the matmul get one warm-up call each.
    sdpa_fn()
    a @ b
    stats = interleaved({"method": fn, "sdpa": sdpa_fn, "matmul": lambda: a @ b}, rounds=rounds, warmup=0)
    peak, how = peak_extra_bytes(fn)
    # SDPA's peak at this shape is measured once per process (in its own cell, which runs first).
    shape_key = (cell.shape["N"], cell.shape["causal"], cell.shape["pass"])
    if shape_key not in _SDPA_PEAKS:
        _SDPA_PEAKS[shape_key] = peak if cell.method == SDPA else peak_extra_bytes(sdpa_fn)[0]
    sdpa_peak = _SDPA_PEAKS[shape_key]
    m, s, mm = stats["method"], stats["sdpa"], stats["matmul"]
    return {
        "median_s": m.median,
        "min_s": m.min,
        "q25_s": m.q25,
        "q75_s": m.q75,
        "reps": len(m.times),
        "first_call_s": first,
        "sdpa_median_s": s.median,
        "ratio_vs_sdpa": m.median / s.median,
        "peak_extra_mib": peak / 2**20,
        "sdpa_peak_extra_mib": sdpa_peak / 2**20,
        "memory_method": how,
        "matmul_gflops": 2 * MATMUL_N**3 / mm.median / 1e9,
    }


def _sdpa_compute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _prepare(cell: Cell, config: SpeedConfig, spec: Method | None, params: dict[str, Any]):
    s = cell.shape
    tensors = _inputs(config, s["N"], config.seed, torch.float32, spec)
    sdpa_tensors = [t.detach().clone() for t in tensors]
    leaves = sdpa_leaves = []
    if s["pass"] == "fwdbwd":
        leaves = requires_grad_inputs(tensors, params)
        sdpa_leaves = requires_grad_inputs(sdpa_tensors, {})
    return tensors, leaves, _sdpa_compute(*sdpa_tensors, s["causal"]), sdpa_leaves


def _finish(values: dict[str, Any], flops_fwd: float, pass_: str) -> dict[str, Any]:
    flops = flops_fwd * (FWDBWD_FACTOR if pass_ == "fwdbwd" else 1.0)
    values["flops"] = flops
    values["gflops"] = flops / values["median_s"] / 1e9
    values["roofline"] = values["gflops"] / values["matmul_gflops"]
    values["status"] = "ok"
    return values


def _measure_sdpa(cell: Cell, config: SpeedConfig) -> dict[str, Any]:
    s = cell.shape
    tensors, leaves, sdpa, sdpa_leaves = _prepare(cell, config, None, {})
    values = _time_cell(cell, config, _sdpa_compute(*tensors, s["causal"]), leaves, sdpa, sdpa_leaves)
    values.update(family="exact", check_error=0.0, keys=None)
    return _finish(values, forward_flops(None, s["B"], s["H"], s["N"], s["D"], s["causal"]), s["pass"])


def _measure_method(cell: Cell, config: SpeedConfig) -> dict[str, Any]:
    spec, s = get_method(cell.method), cell.shape
    keys = cell.params.get("keys")
    base = {"family": spec.family, "keys": keys}
    err, bound = check_error(spec, cell.variant, s["causal"], config, s["N"])
    base["check_error"] = err
    if not err <= bound:
        return {
            **base,
            "status": "wrong",
            "message": f"output differs from the float64 reference by {err:.3g} (bound {bound:.3g}); not timed",
        }
    probe = _inputs(config, s["N"], config.seed, torch.float32, spec)
    params = run_params(spec, *probe, s["causal"], keys, config.seed)
    tensors, leaves, sdpa, sdpa_leaves = _prepare(cell, config, spec, params)

    def compute() -> torch.Tensor:
        return attention(*tensors, is_causal=s["causal"], method=spec.name, backend=cell.variant, **params)

    with stats.collect_stats() as recorded:
        inference(compute)()
    densities = [r["density"] for r in recorded if "density" in r]
    density = sum(densities) / len(densities) if densities else None
    values = _time_cell(cell, config, compute, leaves, sdpa, sdpa_leaves)
    values.update(base, params=describe_params(params), density=density)
    fwd = forward_flops(spec, s["B"], s["H"], s["N"], s["D"], s["causal"], keys=keys, density=density)
    return _finish(values, fwd, s["pass"])


def _peer(name: str):
    from .peers import peers

    for peer in peers():
        if peer.name == name:
            return peer
    raise ValueError(f"unknown peer {name!r}; peers: {[p.name for p in peers()]}")


def _peer_check(peer, spec: Method | None, causal: bool, config: SpeedConfig, n: int, keys: int | None) -> float:
    """The peer's max error at ``min(n, check_n)`` tokens against the float64 reference of the
    method it matches (``spec``; exact attention when it matches none), relative to
    ``max(1, max|gold|)``."""
    n = min(n, config.check_n)
    key = ("peer", peer.name, causal, n, config.batch, config.heads, config.dim, keys)
    if key not in _CHECKS:
        q, k, v = _inputs(config, n, config.seed + 1, torch.float64, spec)
        params = run_params(spec, q, k, v, causal, keys, config.seed) if spec is not None else {}
        if peer.exact and spec is not None:
            gold = attention(q, k, v, is_causal=causal, method=spec.name, backend="reference", **params)
        else:
            gold = attention(q, k, v, is_causal=causal, method="dense", backend="reference")
        low = [t.float() for t in (q, k, v)]
        start = time.perf_counter()
        found = peer.build(*low, is_causal=causal, params=_cast(params, torch.float32))()
        _FIRST_CALLS[(PEER_PREFIX + peer.name, n, causal)] = time.perf_counter() - start
        err = (found.double() - gold).abs().max().item() / max(1.0, gold.abs().max().item())
        _CHECKS[key] = (err if math.isfinite(err) else math.inf, PEER_BOUND)
    return _CHECKS[key][0]


def _measure_peer(cell: Cell, config: SpeedConfig) -> dict[str, Any]:
    peer, s = _peer(cell.method[len(PEER_PREFIX) :]), cell.shape
    base: dict[str, Any] = {"family": "peer", "matches": peer.matches, "settings": peer.settings}
    reason = peer.unavailable()
    if reason is not None:
        return {**base, "status": "not_installed", "message": reason}
    spec = get_method(peer.matches) if peer.matches is not None else None
    keys = cell.params.get("keys")
    try:
        err = _peer_check(peer, spec, s["causal"], config, s["N"], keys)
        base["check_error"] = err
        if peer.exact and not err <= PEER_BOUND:
            message = f"output differs from {peer.matches}'s float64 reference by {err:.3g}; not timed"
            return {**base, "status": "wrong", "message": message}
        probe = _inputs(config, s["N"], config.seed, torch.float32, spec)
        params = run_params(spec, *probe, s["causal"], keys, config.seed) if spec is not None else {}
        tensors, leaves, sdpa, sdpa_leaves = _prepare(cell, config, spec, {})
        compute = peer.build(*tensors, is_causal=s["causal"], params=params)
    except ValueError as error:
        return {**base, "status": "unsupported", "message": str(error)[:2000]}
    values = _time_cell(cell, config, compute, leaves, sdpa, sdpa_leaves)
    values.update(base, keys=keys, params=describe_params(params))
    if spec is None:
        fwd = forward_flops(None, s["B"], s["H"], s["N"], s["D"], s["causal"])
    else:
        fwd = forward_flops(spec, s["B"], s["H"], s["N"], s["D"], s["causal"], keys=keys)
    return _finish(values, fwd, s["pass"])


def _quiet(fn):
    """``fn`` with warnings silenced (peer libraries warn about deprecations on every call)."""

    def run(*args: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)

    return run


def measure(cell: Cell, config: SpeedConfig) -> dict[str, Any]:
    """Measure one speed cell (see the module docstring); errors become ``"error"`` values."""
    if cell.method == SDPA:
        family, run = "exact", _measure_sdpa
    elif cell.method.startswith(PEER_PREFIX):
        family, run = "peer", _quiet(_measure_peer)
    else:
        family, run = get_method(cell.method).family, _measure_method
    slow = _TOO_SLOW.get(_slow_key(cell))
    if slow is not None and slow[0] < cell.shape["N"]:
        message = f"not run: one call already took {slow[1]:.2f} s at N={slow[0]} (limit {config.max_call_s} s)"
        return {"family": family, "status": "too_slow", "message": message}
    try:
        values = run(cell, config)
    except TooSlow as error:
        values = {"status": "too_slow", "message": str(error), "first_call_s": _TOO_SLOW[_slow_key(cell)][1]}
    except NoBackendError as error:
        values = {"status": "unsupported", "message": str(error)[:2000]}
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        values = {"status": "error", "message": f"{type(error).__name__}: {error}"[:2000]}
    return {"family": family, **values}
