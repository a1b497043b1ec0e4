"""The conformance suite of the design (section 5): checks run on the cases of :mod:`.cases`.

* **gold rule** (:func:`check_case`): with ``gold`` the reference in float64, the fast path's error
  (output, log-sum-exp and every input gradient) is at most ``max(floor * scale, factor * error of
  the reference run in the same low dtype)``, factor 2 forward and 4 for gradients; ``scale`` is
  ``max(1, max|gold|)`` of the quantity, or of the largest gradient for gradients. NaN or Inf where
  gold is finite never passes.
* **properties**: causality leak, prefix consistency, ``gradcheck``, dropout, decode equals the full
  sequence, degenerate limit, each generated where the method's capabilities call for it.

A new method registered with honest capabilities is tested with no new test code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import attention, prepare
from ..inputs import build_call
from ..registry import Method, get_method, methods
from .cases import (
    Case,
    Shape,
    conformance_cases,
    make_inputs,
    per_token,
    random_qkv,
    sampled_params,
    slice_params,
    small_shape,
)
from .poison import poison_uninitialized

FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@dataclass
class CheckResult:
    check: str
    case_id: str
    passed: bool
    message: str = ""
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


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
        **inputs["params"],
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


def _query_block(spec: Method, params: dict[str, Any]) -> int:
    return 1 if spec.query_block is None else spec.query_block(spec.params(**params))


def check_causality(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Perturbing future keys and values (by large amounts), and queries past the query's block
    (see ``Method.query_block``), must not change past outputs."""
    shapes = [Shape(1, 2, 2, 48, 48, 8, 8)]
    if spec.capabilities.cross:
        shapes.append(Shape(1, 2, 2, 20, 48, 8, 8))
    unit = _query_block(spec, params)
    worst, case_id = 0.0, f"{spec.name}-{backend}-causality"
    for shape in shapes:
        q, k, v = random_qkv(shape, seed, spec=spec)
        sampled, other = sampled_params(spec, q, k, v, seed), sampled_params(spec, q, k, v, seed + 1)
        t = shape.q_len // 2
        cut = t + shape.kv_len - shape.q_len + 1  # keys at or past `cut` are in query t's future
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[:, :, cut:] = 30.0 * torch.randn_like(k2[:, :, cut:])
        v2[:, :, cut:] = 1e3 * torch.randn_like(v2[:, :, cut:])
        q_cut = -(-(t + 1) // unit) * unit  # queries of later blocks
        if not spec.shared_query:
            q2[:, :, q_cut:] = 30.0 * torch.randn_like(q2[:, :, q_cut:])
        perturbed = dict(sampled)
        for name in per_token(sampled, shape.kv_len):  # future gates too
            perturbed[name] = torch.cat([sampled[name][:, :, :cut], other[name][:, :, cut:]], dim=2)
        before = attention(q, k, v, is_causal=True, method=spec.name, backend=backend, **params, **sampled)
        after = attention(q2, k2, v2, is_causal=True, method=spec.name, backend=backend, **params, **perturbed)
        worst = max(worst, _error(after[:, :, : t + 1], before[:, :, : t + 1]))
    passed = worst <= 1e-9
    message = "" if passed else f"past outputs moved by {worst:.3g}"
    return CheckResult("causality", case_id, passed, message, {"past outputs": (worst, 1e-9)})


def check_prefix(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Causal attention over a prefix equals the prefix of causal attention over the whole (prefixes
    cut at multiples of ``Method.query_block`` where the method selects keys per query block)."""
    q, k, v = random_qkv(Shape(2, 2, 2, 57, 57, 8, 8), seed, spec=spec)
    sampled = sampled_params(spec, q, k, v, seed)
    full = attention(q, k, v, is_causal=True, method=spec.name, backend=backend, **params, **sampled)
    worst = 0.0
    unit = _query_block(spec, params)
    for t in sorted({max(unit, t // unit * unit) for t in (1, 17, 40)}):
        cut = slice_params(sampled, 57, 0, t)
        part = attention(
            q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True, method=spec.name, backend=backend, **params, **cut
        )
        worst = max(worst, _error(part, full[:, :, :t]))
    passed = worst <= 1e-9
    return CheckResult(
        "prefix", f"{spec.name}-{backend}-prefix", passed, "" if passed else f"prefix differs by {worst:.3g}"
    )


def check_decode(spec: Method, params: dict[str, Any], seed: int = 0) -> CheckResult:
    """Decoding in chunks of 1 and more tokens equals what the decoder promises
    (``Decoder.semantics``): ``"full"``, causal attention over the whole sequence; ``"prefix"``,
    at each step the last rows of causal attention over the tokens so far (a step whose prefix the
    method refuses, shorter than its kernel, has nothing to compare with and is skipped; most are
    not); ``"cross"``, at each step causal attention of the step's queries over the keys so far.
    The state's size is ``state_size`` elements per batch row."""
    from ..decode import init_state, state_size, step

    shape = Shape(2, 4, 2 if spec.capabilities.gqa else 4, 37, 37, 8, 8)
    q, k, v = random_qkv(shape, seed, spec=spec)
    sampled = sampled_params(spec, q, k, v, seed)
    semantics = spec.decoder.semantics(spec.params(**params))
    full = attention(q, k, v, is_causal=True, method=spec.name, **params, **sampled)
    state = init_state(spec.name, batch=2, kv_heads=shape.kv_heads, head_dim=8, dtype=torch.float64, **params)
    outs, start, sizes, expected, failures = [], 0, [], [], []
    for n in (1, 1, 5, 1, 13, 16):
        begin, end = start, start + n
        new, start = slice(begin, end), end
        per_step = slice_params(sampled, shape.kv_len, begin, end)
        out, state = step(q[:, :, new], k[:, :, new], v[:, :, new], state, **per_step)
        outs.append(out)
        sizes.append(state.size_bytes())
        bound = state_size(spec.name, end, kv_heads=shape.kv_heads, head_dim=8, query_heads=shape.q_heads, **params)
        expected.append(bound * 2 * 8)
        cut = slice_params(sampled, shape.kv_len, 0, end)
        if semantics == "cross":
            want = attention(q[:, :, new], k[:, :, :end], v[:, :, :end], is_causal=True, method=spec.name, **params)
            failures += _differs(f"step ending at {end}", out, want)
        elif semantics == "prefix":
            try:
                want = attention(
                    q[:, :, :end], k[:, :, :end], v[:, :, :end], is_causal=True, method=spec.name, **params, **cut
                )
            except ValueError:  # a prefix shorter than the method accepts: nothing to compare
                continue
            failures += _differs(f"step ending at {end}", out, want[:, :, begin:end])
    if semantics == "full":
        failures += _differs("decode", torch.cat(outs, dim=2), full)
    if state.length != shape.q_len or min(sizes) <= 0 or sizes != expected:
        failures.append(f"state reports length {state.length} and sizes {sizes}, state_size gives {expected}")
    return CheckResult("decode", f"{spec.name}-decode", not failures, "; ".join(failures))


def _differs(what: str, found: torch.Tensor, want: torch.Tensor) -> list[str]:
    err = _error(found, want)
    return [] if err <= 1e-9 else [f"{what} differs from the attention it stands for by {err:.3g}"]


def check_degenerate(spec: Method, backend: str, seed: int = 0) -> CheckResult | None:
    """With its budget at the maximum, an approximate method equals exact attention."""
    if spec.degenerate_params is None:
        return None
    # spatial methods are causal per axis, which is not dense causal attention: compare non-causal
    causal = spec.capabilities.causal and not (spec.capabilities.spatial_dims and spec.capabilities.noncausal)
    q, k, v = random_qkv(small_shape(spec, 2, 2, 2, 40, 8), seed, spec=spec)
    call = build_call(q, k, v, None, 0.0, causal, None, False, None, False, False, spec.capabilities.spatial_dims)
    params = {**spec.degenerate_params(call), **sampled_params(spec, q, k, v, seed)}
    exact = attention(q, k, v, is_causal=causal, method="dense", backend="reference")
    found = attention(q, k, v, is_causal=causal, method=spec.name, backend=backend, **params)
    err = _error(found, exact)
    passed = err <= 1e-8
    return CheckResult("degenerate", f"{spec.name}-{backend}-degenerate", passed, "" if passed else f"error {err:.3g}")


def check_dropout(spec: Method, backend: str, params: dict[str, Any], seed: int = 0) -> CheckResult | None:
    """Dropout changes the output, and averages to the output without dropout (the weights kept
    are rescaled by 1 / (1 - p)). ``None`` where the backend does not take dropout."""
    q, k, v = random_qkv(small_shape(spec, 2, 2, 2, 16, 8), seed, spec=spec)
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
    shape = small_shape(spec, 1, 2, 1 if spec.capabilities.gqa else 2, 6, 4)
    q, k, v = random_qkv(shape, seed, spec=spec)
    sampled = sampled_params(spec, q, k, v, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def run(q, k, v):
        if spec.shared_query:  # one query token: perturb every row alike
            q = q[:, :, :1].expand_as(q)
        return attention(
            q,
            k,
            v,
            is_causal=causal,
            method=spec.name,
            backend=backend,
            return_lse=spec.capabilities.lse,
            **params,
            **sampled,
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


def run_checks(method_names: list[str] | None = None, quick: bool = True) -> list[CheckResult]:
    """Run the gold rule on every case and every property check, with uninitialised memory
    poisoned; returns one result per check. A check that raises is a failed ``error`` result."""
    specs = [get_method(n) for n in method_names] if method_names else methods()
    thunks: list[tuple[str, Callable[[], CheckResult | None]]] = []
    for case in conformance_cases([s.name for s in specs], quick=quick):
        thunks.append((case.method, lambda c=case: check_case(c)))
    for spec in specs:
        thunks.extend((spec.name, check) for check in property_checks(spec))
    results = []
    with poison_uninitialized():
        for method, thunk in thunks:
            try:
                result = thunk()
            except Exception as error:  # a crash is a failed check, reported with its cause
                result = CheckResult("error", f"{method}-crash", False, f"{type(error).__name__}: {error}")
            if result is not None:
                results.append(result)
    return results
