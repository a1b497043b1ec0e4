"""The conformance grid: shapes, input patterns and cases, generated from the registry's capabilities."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..inputs import build_call
from ..registry import Method, get_method, methods

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
    unless ``ATTNZOO_EXTENDED=1``) rotates sizes and parameter sets so that each pattern runs one
    size and one parameter set per dtype, and
    runs the variant without the log-sum-exp in float32 only."""
    quick = not extended() if quick is None else quick
    specs = [get_method(n) for n in method_names] if method_names else methods()
    cases = []
    for spec in specs:
        patterns = [p for p in PATTERNS if _supports(spec, p)]
        lse_options = (True, False) if spec.capabilities.lse else (False,)
        base_shapes = _base_shapes(spec)
        for backend, (pi, pattern), (di, dtype) in itertools.product(
            spec.backend_names, enumerate(patterns), enumerate(DTYPES)
        ):
            shapes = [base_shapes[(pi + di) % len(base_shapes)]] if quick else base_shapes
            param_sets = [spec.test_params[(pi + di) % len(spec.test_params)]] if quick else spec.test_params
            for base, with_lse, params in itertools.product(shapes, lse_options, param_sets):
                if quick and not with_lse and spec.capabilities.lse and dtype != torch.float32:
                    continue
                shape = pattern.reshape(base)
                cases.append(Case(spec.name, backend, pattern, dtype, shape, tuple(params.items()), with_lse))
    return cases


def _shared(spec: Method, q: torch.Tensor) -> torch.Tensor:
    """Methods that read one query token per head get a query constant along the sequence."""
    return q[:, :, :1].expand_as(q).clone() if spec.shared_query else q


def sampled_params(spec: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int) -> dict[str, Any]:
    """The method's random data-dependent parameters (gates, write strengths) for these inputs."""
    if spec.sample_params is None:
        return {}
    call = build_call(q, k, v, None, 0.0, False, None, False, None, False, False, spec.capabilities.spatial_dims)
    return spec.sample_params(call, torch.Generator().manual_seed(seed + 7919))


def per_token(params: dict[str, Any], length: int) -> list[str]:
    """Names of the tensor parameters that run along the sequence (dim 2 of size ``length``)."""
    return [n for n, t in params.items() if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[2] == length]


def slice_params(params: dict[str, Any], length: int, start: int, stop: int) -> dict[str, Any]:
    """``params`` with its per-token tensors cut to positions ``start:stop``."""
    names = per_token(params, length)
    return {n: (t[:, :, start:stop] if n in names else t) for n, t in params.items()}


def make_inputs(case: Case, seed: int = 0) -> dict[str, Any]:
    """Seeded float32 inputs (``q``, ``k``, ``v``, masks, output cotangents, sampled parameters)."""
    spec = get_method(case.method)
    gen = torch.Generator().manual_seed(seed)
    s = case.shape
    q = _shared(spec, torch.randn(s.dims(s.q_heads, s.q_len, s.head_dim), generator=gen))
    k = torch.randn(s.dims(s.kv_heads, s.kv_len, s.head_dim), generator=gen)
    v = torch.randn(s.dims(s.kv_heads, s.kv_len, s.value_dim), generator=gen)
    grad_out = torch.randn(s.dims(s.q_heads, s.q_len, s.value_dim), generator=gen)
    grad_lse = grad_out[..., 0].clone().normal_(generator=gen)
    return {
        "qkv": (q, k, v),
        "masks": case.pattern.masks(s, gen),
        "grad_out": grad_out,
        "grad_lse": grad_lse,
        "params": sampled_params(spec, q, k, v, seed),
    }


def random_qkv(
    shape: Shape, seed: int, dtype: torch.dtype = torch.float64, spec: Method | None = None
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dims = ((shape.q_heads, shape.q_len), (shape.kv_heads, shape.kv_len), (shape.kv_heads, shape.kv_len))
    q, k, v = (torch.randn(shape.dims(h, n, shape.head_dim), generator=gen, dtype=dtype) for h, n in dims)
    return [q if spec is None else _shared(spec, q), k, v]


def small_shape(spec: Method, batch: int, q_heads: int, kv_heads: int, n: int, dim: int) -> Shape:
    """A small problem in the method's layout (its first spatial form, or a sequence of ``n``)."""
    if spec.capabilities.spatial_dims:
        grid = SPATIAL_SMALL[spec.capabilities.spatial_dims[0]]
        return Shape.grid(grid, head_dim=dim, batch=batch, q_heads=q_heads, kv_heads=kv_heads)
    return Shape(batch, q_heads, kv_heads, n, n, dim, dim)
