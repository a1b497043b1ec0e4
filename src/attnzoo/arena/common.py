"""What the arena's suites share: the parameters a method runs with in a cell (its budget, its
sampled data-dependent tensors), their JSON description for the store, the attention mode a
method is measured in, and the FLOP model (essential FLOPs, density-aware)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..inputs import AttentionCall, build_call
from ..registry import Method

SPARSE_FAMILIES = ("local", "block_sparse", "content_sparse", "hybrid")
# Backward costs 2.5 forwards (five matrix products against two), the convention of
# flash-attn's benchmarks; a training step is then 3.5 forwards.
FWDBWD_FACTOR = 3.5


def call_for(spec: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> AttentionCall:
    """The validated call description a method's ``budget``/``sample_params`` receive."""
    return build_call(q, k, v, None, 0.0, is_causal, None, False, None, False, False, spec.capabilities.spatial_dims)


def measured_mode(spec: Method, prefer_causal: bool) -> bool:
    """``is_causal`` a method is measured in: the preferred mode when it supports it."""
    if prefer_causal:
        return spec.capabilities.causal
    return not spec.capabilities.noncausal


def run_params(
    spec: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, keys: int | None, seed: int
) -> dict[str, Any]:
    """The parameters ``spec`` runs with on these inputs: its call-dependent defaults, its
    ``budget`` at ``keys`` keys per query (when both exist) and its sampled data-dependent tensors
    (gates, write strengths), seeded."""
    call = call_for(spec, q, k, v, is_causal)
    params: dict[str, Any] = {}
    if spec.call_params is not None:
        params.update(spec.call_params(call))
    if keys is not None and spec.budget is not None:
        params.update(spec.budget(call, keys))
    if spec.sample_params is not None:
        params.update(spec.sample_params(call, torch.Generator().manual_seed(seed + 7919)))
    return params


def describe_params(params: dict[str, Any]) -> dict[str, Any]:
    """A JSON description of ``params`` that is stable across runs: tensors become
    ``"tensor[1x4x512x1] sampled"``, callables their name, tuples lists."""

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return f"tensor[{'x'.join(map(str, value.shape))}] sampled"
        if isinstance(value, (tuple, list)):
            return [describe(x) for x in value]
        if isinstance(value, dict):
            return {str(k): describe(x) for k, x in value.items()}
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if callable(value):
            return getattr(value, "__name__", type(value).__name__)
        return type(value).__name__

    return {name: describe(value) for name, value in sorted(params.items())}


def allowed_pairs_count(n_q: int, n_k: int, is_causal: bool) -> int:
    """Number of (query, key) pairs exact attention computes; causal is bottom-right aligned."""
    if not is_causal:
        return n_q * n_k
    offset = n_k - n_q
    return sum(min(n_k, max(0, offset + i + 1)) for i in range(n_q))


def forward_flops(
    spec: Method | None,
    batch: int,
    heads: int,
    n: int,
    dim: int,
    is_causal: bool,
    keys: int | None = None,
    density: float | None = None,
) -> float:
    """Essential forward FLOPs of one self-attention call of ``n`` tokens (``spec=None``: SDPA).

    Softmax-style methods: two matrix products over the pairs they compute, ``2 * pairs * 2 * dim``
    per head; the pairs are every allowed pair (exact), the measured ``density`` of the score matrix
    when the method reported it, else ``min(keys, allowed)`` per query. Linear-family methods: a
    state update and a readout of ``dim x dim`` per token, ``4 * n * dim * dim`` per head.
    """
    per_head: float
    if spec is not None and spec.family == "linear" and not spec.exact:
        per_head = 4.0 * n * dim * dim
    elif spec is not None and spec.name == "aaren":
        per_head = 4.0 * n * dim
    else:
        if spec is not None and spec.family in SPARSE_FAMILIES and density is not None:
            pairs = density * n * n
        elif spec is not None and spec.family in SPARSE_FAMILIES and keys is not None:
            pairs = sum(min(keys, i + 1) for i in range(n)) if is_causal else n * min(keys, n)
        else:
            pairs = allowed_pairs_count(n, n, is_causal)
        per_head = 4.0 * pairs * dim
    return per_head * batch * heads


def requires_grad_inputs(tensors: list[torch.Tensor], params: dict[str, Any]) -> list[torch.Tensor]:
    """Make the inputs and the floating per-token parameters leaves that require grad (a training
    step differentiates the gates too); returns every tensor that gets a gradient."""
    leaves = [t.requires_grad_(True) for t in tensors]
    for name, value in params.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            params[name] = value.detach().clone().requires_grad_(True)
            leaves.append(params[name])
    return leaves


def training_step(compute: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """A forward and backward of ``compute`` against a fixed random cotangent; clears the grads."""
    with torch.no_grad():
        grad = torch.randn_like(compute())

    def step() -> None:
        compute().backward(grad)
        for leaf in leaves:
            leaf.grad = None

    return step


def inference(compute: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``compute`` under ``torch.no_grad``."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return compute()

    return run
