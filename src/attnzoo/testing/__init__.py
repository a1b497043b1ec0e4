"""Conformance checks generated from the registry, shared by the test suite and ``attnzoo check``."""

from .cases import Case, Shape, conformance_cases
from .conformance import (
    CheckResult,
    check_case,
    check_causality,
    check_decode,
    check_degenerate,
    check_dropout,
    check_gradcheck,
    check_prefix,
    property_checks,
    run_checks,
)
from .poison import poison_uninitialized

__all__ = [
    "Case",
    "CheckResult",
    "Shape",
    "check_case",
    "check_causality",
    "check_decode",
    "check_degenerate",
    "check_dropout",
    "check_gradcheck",
    "check_prefix",
    "conformance_cases",
    "poison_uninitialized",
    "property_checks",
    "run_checks",
]
