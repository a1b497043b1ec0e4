"""The conformance suite of the design (section 5), generated from the registry.

Every registered method is checked for every pattern its capabilities allow (causal, cross,
GQA, padding, masks) and every dtype:

* **gold rule**: with ``gold`` the reference in float64, the fast path's error (output,
  log-sum-exp and every input gradient) is at most ``max(floor, factor * error of the
  reference run in the same low dtype)``, factor 2 forward and 4 for gradients; the floor is
  ``FLOORS[dtype] * max(1, max|gold|)``. NaN or Inf where gold is finite never passes.
* properties: causality leak, prefix consistency, degenerate limit, ``gradcheck``.

A new method registered with honest capabilities is tested with no new test code.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..api import attention, prepare
from ..registry import Method, get_method, methods

FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, D) pairs: a single token, sizes off every power of two, a long-ish sequence.
SIZES = ((1, 16), (63, 60), (100, 64), (1000, 16))
# Spatial extents per number of spatial dims, each at least 5 wide so kernel-sized parameters fit.
SPATIAL_SIZES = {1: ((63,), (100,)), 2: ((7, 9), (16, 16)), 3: ((5, 6, 7), (8, 8, 8))}
SPATIAL_SMALL = {1: (6,), 2: (5, 6), 3: (5, 5, 5)}


def extended() -> bool:
    return os.environ.get("ATTNZOO_EXTENDED", "") not in ("", "0")


@dataclass(frozen=True)
class Shape:
    batch: int = 2
    q_heads: int = 2
    kv_heads: int = 2
    q_len: int = 63
    kv_len: int = 63
    head_dim: int = 16
    value_dim: int = 16
    spatial: tuple[int, ...] = ()  # spatial methods: [B, H, *spatial, D], q_len = kv_len = prod

    @classmethod
    def grid(cls, extent: tuple[int, ...], head_dim: int, **kwargs: int) -> Shape:
        n = math.prod(extent)
        return cls(q_len=n, kv_len=n, head_dim=head_dim, value_dim=head_dim, spatial=extent, **kwargs)

    def dims(self, heads: int, n: int, last: int) -> tuple[int, ...]:
        """A tensor shape ``[B, heads, *positions, last]``."""
        return (self.batch, heads, *(self.spatial or (n,)), last)

    def __str__(self) -> str:
        heads = f"H{self.q_heads}" + (f"kv{self.kv_heads}" if self.kv_heads != self.q_heads else "")
        if self.spatial:
            return f"B{self.batch}{heads}S{'x'.join(map(str, self.spatial))}D{self.head_dim}"
        lens = f"N{self.q_len}" + (f"k{self.kv_len}" if self.kv_len != self.q_len else "")
        return f"B{self.batch}{heads}{lens}D{self.head_dim}"


@dataclass(frozen=True)
class Pattern:
    """An input pattern: which capabilities it needs, how it reshapes the problem, which masks it adds."""

    name: str
    needs: tuple[str, ...]
    causal: bool
    reshape: Callable[[Shape], Shape] = lambda s: s
    masks: Callable[[Shape, torch.Generator], dict[str, torch.Tensor]] = lambda s, g: {}
    sequence_only: bool = False  # changes lengths, so it has no spatial form


def _padding(shape: Shape, gen: torch.Generator, left: bool) -> dict[str, torch.Tensor]:
    lengths = torch.randint(1, shape.kv_len + 1, (shape.batch,), generator=gen)
    lengths[0] = 0 if left else lengths[0]  # a sequence with no real key: its rows must be 0
    positions = torch.arange(shape.kv_len)
    kv_mask = positions[None] >= shape.kv_len - lengths[:, None] if left else positions[None] < lengths[:, None]
    return {"kv_mask": kv_mask}


def _bool_mask(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.rand(shape.batch, 1, shape.q_len, shape.kv_len, generator=gen) < 0.7
    mask[:, :, 0] = False  # a row with no visible key
    return {"attn_mask": mask}


def _float_mask(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"attn_mask": torch.randn(1, shape.q_heads, shape.q_len, shape.kv_len, generator=gen)}


def _key_bias(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A float mask broadcast over heads and queries: ``[B, 1, 1, Nk]``."""
    return {"attn_mask": torch.randn(shape.batch, 1, 1, shape.kv_len, generator=gen)}


def _longer_keys(s: Shape) -> Shape:
    return replace(s, kv_len=s.q_len + 37)


def _shorter_keys(s: Shape) -> Shape:
    return replace(s, kv_len=max(1, s.q_len // 2))


PATTERNS = (
    Pattern("full", ("noncausal",), False),
    Pattern("causal", ("causal",), True),
    Pattern("cross", ("cross", "noncausal"), False, _longer_keys, sequence_only=True),
    Pattern("cross_causal", ("cross", "causal"), True, _longer_keys, sequence_only=True),
    Pattern("cross_causal_more_queries", ("cross", "causal"), True, _shorter_keys, sequence_only=True),
    Pattern("gqa", ("gqa", "noncausal"), False, lambda s: replace(s, q_heads=4, kv_heads=2)),
    Pattern("gqa_causal", ("gqa", "causal"), True, lambda s: replace(s, q_heads=4, kv_heads=1)),
    Pattern("kv_mask_right", ("kv_mask", "noncausal"), False, masks=lambda s, g: _padding(s, g, left=False)),
    Pattern("kv_mask_left_causal", ("kv_mask", "causal"), True, masks=lambda s, g: _padding(s, g, left=True)),
    Pattern("attn_mask_bool", ("attn_mask", "noncausal"), False, masks=_bool_mask),
    Pattern("attn_mask_float_causal", ("attn_mask", "causal"), True, masks=_float_mask),
    Pattern("attn_mask_broadcast", ("attn_mask", "noncausal"), False, masks=_key_bias),
)


@dataclass(frozen=True)
class Case:
    method: str
    backend: str
    pattern: Pattern
    dtype: torch.dtype
    shape: Shape
    params: tuple[tuple[str, Any], ...] = ()
    return_lse: bool = False

    @property
    def id(self) -> str:
        params = "".join(f"-{k}={v}" for k, v in self.params)
        lse = "-lse" if self.return_lse else ""
        return f"{self.method}-{self.backend}-{self.pattern.name}-{str(self.dtype)[6:]}-{self.shape}{params}{lse}"


@dataclass
class CheckResult:
    check: str
    case_id: str
    passed: bool
    message: str = ""
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def _supports(spec: Method, pattern: Pattern) -> bool:
    if pattern.sequence_only and spec.capabilities.spatial_dims:
        return False
    return all(getattr(spec.capabilities, cap) for cap in pattern.needs)


def _base_shapes(spec: Method) -> list[Shape]:
    """Sequence sizes, or for a spatial method its grids (every supported number of dims)."""
    if not spec.capabilities.spatial_dims:
        return [Shape(q_len=n, kv_len=n, head_dim=d, value_dim=d) for n, d in SIZES]
    grids = [g for dims in spec.capabilities.spatial_dims for g in SPATIAL_SIZES[dims]]
    return [Shape.grid(g, head_dim=(16, 60, 64)[i % 3]) for i, g in enumerate(grids)]


def conformance_cases(method_names: list[str] | None = None, quick: bool | None = None) -> list[Case]:
    """Every (method, backend, pattern, dtype, size, LSE, params) case. ``quick`` (the default
    unless ``ATTNZOO_EXTENDED=1``) rotates sizes so that each pattern runs one size per dtype, and
    runs the variant without the log-sum-exp in float32 only."""
    quick = not extended() if quick is None else quick
    specs = [get_method(n) for n in method_names] if method_names else methods()
    cases = []
    for spec in specs:
        patterns = [p for p in PATTERNS if _supports(spec, p)]
        lse_options = (True, False) if spec.capabilities.lse else (False,)
        for backend, (pi, pattern), (di, dtype) in itertools.product(
            spec.backend_names, enumerate(patterns), enumerate(DTYPES)
        ):
            shapes = _base_shapes(spec)
            shapes = [shapes[(pi + di) % len(shapes)]] if quick else shapes
            for base, with_lse, params in itertools.product(shapes, lse_options, spec.test_params):
                if quick and not with_lse and spec.capabilities.lse and dtype != torch.float32:
                    continue
                shape = pattern.reshape(base)
                cases.append(Case(spec.name, backend, pattern, dtype, shape, tuple(params.items()), with_lse))
    return cases


def make_inputs(case: Case, seed: int = 0) -> dict[str, Any]:
    """Seeded float32 inputs (``q``, ``k``, ``v``, masks, output cotangents) for a case."""
    gen = torch.Generator().manual_seed(seed)
    s = case.shape
    q = torch.randn(s.dims(s.q_heads, s.q_len, s.head_dim), generator=gen)
    k = torch.randn(s.dims(s.kv_heads, s.kv_len, s.head_dim), generator=gen)
    v = torch.randn(s.dims(s.kv_heads, s.kv_len, s.value_dim), generator=gen)
    grad_out = torch.randn(s.dims(s.q_heads, s.q_len, s.value_dim), generator=gen)
    grad_lse = grad_out[..., 0].clone().normal_(generator=gen)
    return {"qkv": (q, k, v), "masks": case.pattern.masks(s, gen), "grad_out": grad_out, "grad_lse": grad_lse}


def _forward_backward(case: Case, inputs: dict[str, Any], backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run one backend in ``dtype``; return out, lse and the input gradients (all float64)."""
    spec = get_method(case.method)
    q, k, v = (t.to(dtype).requires_grad_(spec.capabilities.differentiable) for t in inputs["qkv"])
    masks = {n: (m if m.dtype == torch.bool else m.to(dtype)) for n, m in inputs["masks"].items()}
    result = attention(
        q,
        k,
        v,
        is_causal=case.pattern.causal,
        method=case.method,
        backend=backend,
        return_lse=case.return_lse,
        **masks,
        **dict(case.params),
    )
    out, lse = result if case.return_lse else (result, None)
    found = {"out": out.detach().double()}
    loss = (out.double() * inputs["grad_out"].double()).sum()
    if lse is not None:
        found["lse"] = lse.detach().double()
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0).double() * inputs["grad_lse"].double()).sum()
    if spec.capabilities.differentiable:
        grads = torch.autograd.grad(loss, (q, k, v))
        found.update({f"grad_{n}": g.double() for n, g in zip("qkv", grads)})
    return found


def _error(found: torch.Tensor, gold: torch.Tensor) -> float:
    """Max absolute error; infinite where non-finite values disagree with gold's."""
    if not torch.equal(torch.isfinite(found), torch.isfinite(gold)):
        return float("inf")
    finite = torch.isfinite(gold)
    if not finite.any():
        return 0.0 if torch.equal(found, gold) else float("inf")
    return (found[finite] - gold[finite]).abs().max().item()


def _magnitude(value: torch.Tensor) -> float:
    """``max(1, max|value|)`` over the finite entries."""
    finite = value[torch.isfinite(value)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def check_case(case: Case, seed: int = 0) -> CheckResult:
    """The gold rule for one case: fast vs float64 reference, relative to the low-dtype reference."""
    inputs = make_inputs(case, seed)
    gold = _forward_backward(case, inputs, "reference", torch.float64)
    reference = _forward_backward(case, inputs, "reference", case.dtype)
    fast = _forward_backward(case, inputs, case.backend, case.dtype)
    failures, errors = [], {}
    # A gradient's floor scales with the whole backward pass (its largest gradient): a gradient
    # that cancels to exactly 0 (one visible key, no LSE term) still carries that pass's rounding.
    grad_scale = max((_magnitude(g) for n, g in gold.items() if n.startswith("grad_")), default=1.0)
    for name, gold_value in gold.items():
        is_grad = name.startswith("grad_")
        factor = 4.0 if is_grad else 2.0
        scale = grad_scale if is_grad else _magnitude(gold_value)
        bound = max(FLOORS[case.dtype] * scale, factor * _error(reference[name], gold_value))
        err = _error(fast[name], gold_value)
        errors[name] = (err, bound)
        if not err <= bound:
            failures.append(f"{name}: error {err:.3g} > bound {bound:.3g}")
    return CheckResult("gold", case.id, not failures, "; ".join(failures), errors)


def _property_cases(spec: Method) -> Iterator[tuple[str, dict[str, Any]]]:
    for backend in [*spec.backend_names, "reference"]:
        for params in spec.test_params:
            yield backend, params


def _qkv(shape: Shape, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dims = ((shape.q_heads, shape.q_len), (shape.kv_heads, shape.kv_len), (shape.kv_heads, shape.kv_len))
    return [torch.randn(shape.dims(h, n, shape.head_dim), generator=gen, dtype=dtype) for h, n in dims]


def _small_shape(spec: Method, batch: int, q_heads: int, kv_heads: int, n: int, dim: int) -> Shape:
    """A small problem in the method's layout (its first spatial form, or a sequence of ``n``)."""
    if spec.capabilities.spatial_dims:
        grid = SPATIAL_SMALL[spec.capabilities.spatial_dims[0]]
        return Shape.grid(grid, head_dim=dim, batch=batch, q_heads=q_heads, kv_heads=kv_heads)
    return Shape(batch, q_heads, kv_heads, n, n, dim, dim)


def check_causality(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Perturbing future keys and values (by large amounts) must not change past outputs."""
    shapes = [Shape(1, 2, 2, 48, 48, 8, 8)]
    if spec.capabilities.cross:
        shapes.append(Shape(1, 2, 2, 20, 48, 8, 8))
    worst, case_id = 0.0, f"{spec.name}-{backend}-causality"
    for shape in shapes:
        q, k, v = _qkv(shape, seed)
        t = shape.q_len // 2
        cut = t + shape.kv_len - shape.q_len + 1  # keys at or past `cut` are in query t's future
        k2, v2 = k.clone(), v.clone()
        k2[:, :, cut:] = 30.0 * torch.randn_like(k2[:, :, cut:])
        v2[:, :, cut:] = 1e3 * torch.randn_like(v2[:, :, cut:])
        before = attention(q, k, v, is_causal=True, method=spec.name, backend=backend, **params)
        after = attention(q, k2, v2, is_causal=True, method=spec.name, backend=backend, **params)
        worst = max(worst, _error(after[:, :, : t + 1], before[:, :, : t + 1]))
    passed = worst <= 1e-9
    return CheckResult("causality", case_id, passed, "" if passed else f"past outputs moved by {worst:.3g}")


def check_prefix(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Causal attention over a prefix equals the prefix of causal attention over the whole."""
    q, k, v = _qkv(Shape(2, 2, 2, 57, 57, 8, 8), seed)
    full = attention(q, k, v, is_causal=True, method=spec.name, backend=backend, **params)
    worst = 0.0
    for t in (1, 17, 40):
        part = attention(
            q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True, method=spec.name, backend=backend, **params
        )
        worst = max(worst, _error(part, full[:, :, :t]))
    passed = worst <= 1e-9
    return CheckResult(
        "prefix", f"{spec.name}-{backend}-prefix", passed, "" if passed else f"prefix differs by {worst:.3g}"
    )


def check_decode(spec: Method, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Decoding in chunks of 1 and more tokens equals causal attention over the whole sequence."""
    from ..decode import init_state, step

    shape = Shape(2, 4, 2 if spec.capabilities.gqa else 4, 37, 37, 8, 8)
    q, k, v = _qkv(shape, seed)
    full = attention(q, k, v, is_causal=True, method=spec.name, **params)
    state = init_state(spec.name, batch=2, kv_heads=shape.kv_heads, head_dim=8, dtype=torch.float64, **params)
    outs, start, sizes = [], 0, []
    for n in (1, 1, 5, 1, 13, 16):
        out, state = step(q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n], state)
        outs.append(out)
        sizes.append(state.size_bytes())
        start += n
    err = _error(torch.cat(outs, dim=2), full)
    failures = [] if err <= 1e-9 else [f"decode differs from the full sequence by {err:.3g}"]
    if state.length != shape.q_len or min(sizes) <= 0:
        failures.append(f"state reports length {state.length} and sizes {sizes}")
    return CheckResult("decode", f"{spec.name}-decode", not failures, "; ".join(failures))


def check_degenerate(spec: Method, backend: str, seed: int = 0) -> CheckResult | None:
    """With its budget at the maximum, an approximate method equals exact attention."""
    if spec.degenerate_params is None:
        return None
    causal = spec.capabilities.causal
    q, k, v = _qkv(_small_shape(spec, 2, 2, 2, 40, 8), seed)
    _, call, _ = prepare(q, k, v, is_causal=causal, method="dense")
    params = spec.degenerate_params(call)
    exact = attention(q, k, v, is_causal=causal, method="dense", backend="reference")
    found = attention(q, k, v, is_causal=causal, method=spec.name, backend=backend, **params)
    err = _error(found, exact)
    passed = err <= 1e-8
    return CheckResult("degenerate", f"{spec.name}-{backend}-degenerate", passed, "" if passed else f"error {err:.3g}")


def check_dropout(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult | None:
    """Dropout changes the output, and averages to the output without dropout (the weights kept
    are rescaled by 1 / (1 - p)). ``None`` where the backend does not take dropout."""
    q, k, v = _qkv(_small_shape(spec, 2, 2, 2, 16, 8), seed)
    _, call, method_params = prepare(q, k, v, dropout_p=0.3, method=spec.name, **params)
    if backend != "reference" and spec.backend(backend).why_not(call, method_params):
        return None
    exact = attention(q, k, v, method=spec.name, backend=backend, **params)
    torch.manual_seed(seed)
    samples = torch.stack(
        [attention(q, k, v, dropout_p=0.3, method=spec.name, backend=backend, **params) for _ in range(400)]
    )
    bias = (samples.mean(dim=0) - exact).abs().max().item()
    varies = (samples[0] - samples[1]).abs().max().item()
    # 400 draws: the mean is off by <= 0.07 over seeds 0-4; a missing 1/(1-p) rescale is off by >= 0.39.
    failures = [] if bias <= 0.15 else [f"mean over 400 draws is off by {bias:.3g} (unscaled or biased dropout)"]
    if varies == 0.0:
        failures.append("two draws gave the same output: dropout was not applied")
    return CheckResult("dropout", f"{spec.name}-{backend}-dropout", not failures, "; ".join(failures))


def check_gradcheck(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """``torch.autograd.gradcheck`` in float64 on tiny shapes (outputs and log-sum-exp)."""
    causal = spec.capabilities.causal
    shape = _small_shape(spec, 1, 2, 1 if spec.capabilities.gqa else 2, 6, 4)
    q, k, v = (t.requires_grad_() for t in _qkv(shape, seed))

    def run(q, k, v):
        return attention(
            q, k, v, is_causal=causal, method=spec.name, backend=backend, return_lse=spec.capabilities.lse, **params
        )

    try:
        passed = torch.autograd.gradcheck(run, (q, k, v), eps=1e-6, atol=1e-5, raise_exception=True)
        message = ""
    except Exception as error:  # gradcheck reports a mismatch as an exception
        passed, message = False, str(error).splitlines()[0]
    return CheckResult("gradcheck", f"{spec.name}-{backend}-gradcheck", passed, message)


def property_checks(spec: Method) -> list[Callable[[], CheckResult | None]]:
    """Every property check that applies to ``spec``, as thunks (tests parametrize over them)."""
    checks: list[Callable[[], CheckResult | None]] = []
    # Causality for spatial methods is per dimension and method-specific: their issue owns that check.
    sequence_causal = spec.capabilities.causal and not spec.capabilities.spatial_dims
    for backend, params in _property_cases(spec):
        if sequence_causal:
            checks.append(lambda b=backend, p=params: check_causality(spec, b, p))
            checks.append(lambda b=backend, p=params: check_prefix(spec, b, p))
        if spec.capabilities.differentiable and backend != "reference":
            checks.append(lambda b=backend, p=params: check_gradcheck(spec, b, p))
        if spec.capabilities.dropout and backend != "reference":
            checks.append(lambda b=backend, p=params: check_dropout(spec, b, p))
    if spec.capabilities.decode:
        checks.extend(lambda p=params: check_decode(spec, p) for params in spec.test_params)
    for backend in spec.backend_names:
        if spec.degenerate_params is not None:
            checks.append(lambda b=backend: check_degenerate(spec, b))
    return checks


def run_checks(
    method_names: list[str] | None = None,
    quick: bool = True,
    progress: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run the gold rule on every case and every property check; returns one result per check."""
    from .poison import poison_uninitialized

    specs = [get_method(n) for n in method_names] if method_names else methods()
    results = []
    with poison_uninitialized():
        thunks: list[Callable[[], CheckResult | None]] = []
        for case in conformance_cases([s.name for s in specs], quick=quick):
            thunks.append(lambda c=case: check_case(c))
        for spec in specs:
            thunks.extend(property_checks(spec))
        for thunk in thunks:
            try:
                result = thunk()
            except Exception as error:  # a crash is a failed check, reported with its cause
                result = CheckResult(
                    "error", getattr(thunk, "__name__", "check"), False, f"{type(error).__name__}: {error}"
                )
            if result is None:
                continue
            results.append(result)
            if progress is not None:
                progress(result)
    return results
