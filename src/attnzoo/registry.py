"""The registry: every method as a :class:`Method` spec with capabilities, parameters, a
reference and its backends. Tests, docs, the CLI and the arena are generated from it."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from .inputs import AttentionCall
from .params import MethodParams

FAMILIES = ("exact", "local", "block_sparse", "content_sparse", "linear", "low_rank", "hybrid")
REFERENCE = "reference"


class AttentionOutput(NamedTuple):
    """What a reference or backend returns: the output and, when asked for, the log-sum-exp
    ``[B, H, Nq]`` and the recurrent state."""

    out: torch.Tensor
    lse: torch.Tensor | None = None
    state: Any = None


Runner = Callable[[AttentionCall, Any], AttentionOutput]
Reasons = Callable[[AttentionCall, Any], list[str]]


def _no_reasons(call: AttentionCall, params: Any) -> list[str]:
    return []


def _reference_reasons(call: AttentionCall, params: Any) -> list[str]:
    return ["dropout_p > 0: references compute the attention without dropout"] if call.dropout_p > 0 else []


@dataclass(frozen=True)
class Capabilities:
    """What a method supports. Every flag turns on the matching conformance checks."""

    causal: bool = True
    noncausal: bool = True
    cross: bool = False
    gqa: bool = False
    kv_mask: bool = False
    attn_mask: bool = False
    dropout: bool = False
    decode: bool = False
    varlen: bool = False
    spatial_dims: tuple[int, ...] = ()
    differentiable: bool = True
    lse: bool = False
    state: bool = False

    def flags(self) -> list[str]:
        names = [f.name for f in fields(self) if f.name != "spatial_dims" and getattr(self, f.name)]
        if self.spatial_dims:
            names.append("spatial=" + "/".join(f"{d}d" for d in self.spatial_dims))
        return names


@dataclass(frozen=True)
class Backend:
    """A fast path. ``reasons`` returns why it cannot run these inputs (empty: it can)."""

    name: str
    run: Runner
    reasons: Reasons = _no_reasons
    requires: tuple[str, ...] = ()
    description: str = ""

    def why_not(self, call: AttentionCall, params: Any) -> list[str]:
        missing = [pkg for pkg in self.requires if importlib.util.find_spec(pkg) is None]
        if missing:
            return [f"requires the package(s) {', '.join(missing)}, not installed"]
        return list(self.reasons(call, params))


@dataclass(frozen=True)
class Decoder:
    """Incremental decoding of a method with the ``decode`` capability.

    ``init_state(batch, kv_heads, head_dim, value_dim, dtype, device, params)`` returns an empty
    state; ``step(call, state, params)`` attends the new tokens of ``call`` (queries, keys and
    values of ``n_new >= 1`` positions, causal, after everything in ``state``) and returns
    ``(AttentionOutput, new_state)``. A state has ``size_bytes() -> int``.

    ``state_size(seq_len, kv_heads, head_dim, value_dim, params, query_heads)`` gives the elements
    a state holds per batch row after ``seq_len`` tokens (Zoology's state size); ``size_bytes()``
    is that times the batch and the element size. ``query_heads`` matters only to decoders that
    also keep the queries (methods whose rows mix queries).

    ``semantics(params)`` says what a step equals: ``"full"``, the
    matching rows of causal attention over the whole sequence; ``"prefix"``, the last rows of
    causal attention over every token seen so far (a query's row may depend on later queries of
    its block or group, which decoding cannot know); ``"cross"``, causal (bottom-right) attention
    of the step's queries alone over every key seen so far (the step's queries form their own
    query blocks).
    """

    init_state: Callable[..., Any]
    step: Callable[[AttentionCall, Any, Any], tuple[AttentionOutput, Any]]
    state_size: Callable[[int, int, int, int, Any, int], int] | None = None
    semantics: Callable[[Any], str] = lambda params: "full"


@dataclass(frozen=True)
class Paper:
    title: str
    url: str


@dataclass(frozen=True)
class Method:
    """A registered attention method.

    ``test_params`` are parameter sets the conformance suite runs; ``degenerate_params``
    maps a call to parameters under which the method must equal exact attention (its budget
    at the maximum), or is ``None`` for exact methods. ``check(call, params)`` validates the
    parameters against the inputs (a kernel larger than the extent, say) and raises
    ``ValueError`` naming the parameter, before any backend runs. ``query_block(params)`` is set
    by methods that choose keys per block of queries (content-selected block-sparse methods): a
    query's output may then depend on the later queries of its block (never on later keys or
    values, nor on queries of later blocks), so the prefix check cuts at multiples of it.
    ``sample_params(call, generator)`` returns random valid data-dependent parameters for a call
    (gates, write strengths: tensors with the sequence on dim 2); the conformance suite, the
    bad-input table and the arena merge them into ``test_params``. ``shared_query`` marks a
    method that reads one query token per head (the query must be constant along the sequence).
    ``budget(call, keys)`` is set by sparse methods: parameters under which a query attends about
    ``keys`` keys (the arena sweeps it: a fixed count for the speed suite, a fraction of the
    sequence for the fidelity suite, which measures the density actually reached).
    ``call_params(call)`` gives defaults that depend on the call for callers that have no choice
    of their own (the arena, model integrations): cosformer's ``max_len``, say.
    ``query_mixing`` marks a method whose output for a query depends on other (earlier) queries
    (flowformer's flow normalisation, cca's core tokens); with ``query_block`` and
    ``shared_query`` it decides :attr:`rows_independent`.
    """

    name: str
    family: str
    exact: bool
    summary: str
    paper: Paper
    capabilities: Capabilities
    params: type[MethodParams]
    reference: Runner
    backends: tuple[Backend, ...]
    test_params: tuple[dict[str, Any], ...] = ({},)
    degenerate_params: Callable[[AttentionCall], dict[str, Any] | None] | None = None
    decoder: Decoder | None = None
    notes: str = ""
    check: Callable[[AttentionCall, Any], None] | None = None
    query_block: Callable[[Any], int] | None = None
    sample_params: Callable[[AttentionCall, torch.Generator], dict[str, Any]] | None = None
    shared_query: bool = False
    budget: Callable[[AttentionCall, int], dict[str, Any]] | None = None
    call_params: Callable[[AttentionCall], dict[str, Any]] | None = None
    query_mixing: bool = False

    @property
    def rows_independent(self) -> bool:
        """True when a query's output depends only on that query and the keys and values, so a
        caller holding only the last queries (a model's KV cache at decode) can compute their rows
        alone, the earlier queries replaced by anything."""
        return not (self.query_mixing or self.shared_query or self.query_block is not None)

    def backend(self, name: str) -> Backend:
        if name == REFERENCE:
            return Backend(REFERENCE, self.reference, _reference_reasons, description="the dense readable reference")
        for b in self.backends:
            if b.name == name:
                return b
        valid = [b.name for b in self.backends] + [REFERENCE]
        raise ValueError(f"unknown backend {name!r} for method {self.name!r}; valid: {valid}")

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (the one place that makes it visible everywhere)."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {method.family!r}")
    names = [b.name for b in method.backends]
    if len(set(names)) != len(names) or REFERENCE in names:
        raise ValueError(f"backend names of {method.name!r} must be unique and not {REFERENCE!r}: {names}")
    if not (method.capabilities.causal or method.capabilities.noncausal):
        raise ValueError(f"method {method.name!r} must support causal or non-causal attention")
    if method.capabilities.decode != (method.decoder is not None):
        raise ValueError(f"method {method.name!r}: the decode capability needs a decoder and vice versa")
    for params in method.test_params:
        method.params(**params)
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """Register ``method`` for the duration of a ``with`` block (tests, experiments)."""
    register(method)
    try:
        yield method
    finally:
        unregister(method.name)


def get_method(name: Any) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}") from None


def methods(family: str | None = None) -> list[Method]:
    """Every registered method (optionally of one family), sorted by family then name."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    found = [m for m in _METHODS.values() if family is None or m.family == family]
    return sorted(found, key=lambda m: (FAMILIES.index(m.family), m.name))


def capability_errors(method: Method, call: AttentionCall) -> list[str]:
    """The ways ``call`` asks for something ``method`` does not support (argument named first)."""
    caps = method.capabilities
    errors = []
    if call.is_causal and not caps.causal:
        errors.append(f"is_causal=True: method {method.name!r} is non-causal only")
    if not call.is_causal and not caps.noncausal:
        errors.append(f"is_causal=False: method {method.name!r} is causal only; pass is_causal=True")
    if call.q_len != call.kv_len and not caps.cross:
        errors.append(
            f"key: method {method.name!r} needs as many keys as queries (no cross attention), "
            f"got Nq={call.q_len}, Nk={call.kv_len}"
        )
    if call.q_heads != call.kv_heads and not caps.gqa:
        errors.append(
            f"key: method {method.name!r} needs as many key/value heads as query heads (no GQA), "
            f"got {call.kv_heads} and {call.q_heads}"
        )
    if call.kv_mask is not None and not caps.kv_mask:
        errors.append(f"kv_mask: method {method.name!r} does not support padding masks")
    if call.attn_mask is not None and not caps.attn_mask:
        errors.append(
            f"attn_mask: method {method.name!r} cannot honour an arbitrary dense mask; use kv_mask for padding"
        )
    if call.dropout_p > 0 and not caps.dropout:
        errors.append(f"dropout_p: method {method.name!r} does not support dropout")
    if call.return_lse and not caps.lse:
        errors.append(f"return_lse: method {method.name!r} has no log-sum-exp (not a softmax method)")
    if call.return_state and not caps.state:
        errors.append(f"return_state: method {method.name!r} has no recurrent state")
    if call.requires_grad and not caps.differentiable:
        errors.append(f"query/key/value require grad but method {method.name!r} is not differentiable")
    return errors
