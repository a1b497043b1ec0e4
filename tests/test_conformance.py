"""The conformance suite, generated from the registry: no per-method test code."""

import pytest

import attnzoo
from attnzoo.testing import check_case, conformance_cases, property_checks

CASES = conformance_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gold_rule(case):
    result = check_case(case)
    assert result.passed, result.message


PROPERTY_CHECKS = [(spec.name, check) for spec in attnzoo.methods() for check in property_checks(spec)]


@pytest.mark.parametrize("name,check", PROPERTY_CHECKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PROPERTY_CHECKS)])
def test_properties(name, check):
    result = check()
    if result is None:
        pytest.skip("not applicable")
    assert result.passed, f"{result.check} {result.case_id}: {result.message}"


def test_every_method_has_cases_for_every_backend():
    for spec in attnzoo.methods():
        backends = {c.backend for c in CASES if c.method == spec.name}
        assert backends == set(spec.backend_names), spec.name


def test_odd_sizes_are_in_the_quick_grid():
    lengths = {c.shape.q_len for c in CASES}
    dims = {c.shape.head_dim for c in CASES}
    assert {1, 63, 100, 1000} <= lengths
    assert {16, 60, 64} <= dims
