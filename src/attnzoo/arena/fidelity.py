"""The fidelity suite: how far each method's output is from exact attention on the same inputs.

Inputs are real query/key/value tensors captured from all-MiniLM-L6-v2 running over standard-library
docstrings (one cell per layer, every head) and synthetic ones (:func:`.data.synthetic_qkv`).
Sparse methods run at budgets of 1/2 to 1/16 of the allowed (query, key) pairs; the density they
actually reach is measured from their effective attention matrix (:mod:`.probe`), as is the
attention-mass recall (the share of exact attention's mass that falls on the pairs a method
computes). Other methods run once with their defaults. Causal methods are also checked for a
causality leak: perturbing the future must not change past outputs.

MiniLM is a bidirectional encoder: methods are measured non-causally on it where they can; the
synthetic inputs are attended causally where the method can (the language-model case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..api import attention
from ..errors import NoBackendError
from ..registry import Method, get_method
from . import data, probe
from .common import describe_params, measured_mode, run_params
from .store import Cell

SUITE = "fidelity"
MINILM = "minilm"
SYNTHETIC_KINDS = ("randn", "local", "sink")


@dataclass(frozen=True)
class FidelityConfig:
    """Sources, sizes and budgets of the fidelity suite."""

    minilm_tokens: int = 512
    minilm_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    synthetic_kinds: tuple[str, ...] = SYNTHETIC_KINDS
    synthetic_n: int = 1024
    heads: int = 4
    dim: int = 64
    budgets: tuple[float, ...] = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
    seed: int = 0


QUICK = FidelityConfig(minilm_tokens=256, minilm_layers=(0, 2, 5), synthetic_kinds=("randn", "local"), synthetic_n=512)


def plan(
    methods: list[Method], config: FidelityConfig, threads: int, sizes: tuple[int, ...] | None = None
) -> list[Cell]:
    """Every cell: each source (MiniLM layers, synthetic kinds) x method x budget."""
    sources: list[dict[str, Any]] = []
    minilm_n = sizes[0] if sizes else config.minilm_tokens
    synthetic_sizes = sizes or (config.synthetic_n,)
    for layer in config.minilm_layers:
        sources.append({"source": MINILM, "layer": layer, "B": 1, "H": 12, "N": min(minilm_n, 512), "D": 32})
    for kind in config.synthetic_kinds:
        for n in synthetic_sizes:
            sources.append(
                {"source": f"synthetic:{kind}", "layer": None, "B": 1, "H": config.heads, "N": n, "D": config.dim}
            )
    cells = []
    for source in sources:
        for spec in methods:
            causal = measured_mode(spec, prefer_causal=source["source"] != MINILM)
            budgets: tuple[float | None, ...] = config.budgets if spec.budget is not None else (None,)
            for budget in budgets:
                shape = {**source, "causal": causal}
                cells.append(Cell(SUITE, spec.name, "default", {"budget": budget}, shape, threads=threads))
    return cells


def estimate_bytes(cell: Cell) -> int:
    """Score matrices of the exact float64 reference and the probe, with slack."""
    s = cell.shape
    return s["B"] * s["H"] * s["N"] * s["N"] * 8 * 6 + s["B"] * s["H"] * s["N"] * s["D"] * 8 * 12


def _inputs(cell: Cell, config: FidelityConfig, spec: Method) -> list[torch.Tensor]:
    """The cell's float32 ``q, k, v``; a model's own softmax scale is folded into the queries so
    every method runs with the default ``1/sqrt(D)``."""
    s = cell.shape
    if s["source"] == MINILM:
        layer = next(x for x in data.minilm_qkv(s["N"], layers=[s["layer"]]) if x.layer == s["layer"])
        tensors = [layer.q * (layer.scale * layer.q.shape[-1] ** 0.5), layer.k, layer.v]
    else:
        kind = s["source"].split(":", 1)[1]
        tensors = list(data.synthetic_qkv(kind, s["B"], s["H"], s["N"], s["D"], seed=config.seed))
    if spec.shared_query:
        tensors[0] = tensors[0][:, :, :1].expand_as(tensors[0]).contiguous()
    return [t.float() for t in tensors]


def _relative_errors(out: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-head ``||out - exact|| / ||exact||`` over the sequence and features: ``[H]`` (batch mean)."""
    diff = (out.double() - exact).flatten(2).norm(dim=-1)
    return (diff / exact.flatten(2).norm(dim=-1).clamp_min(1e-300)).mean(0)


def _cosine(out: torch.Tensor, exact: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(out.double(), exact, dim=-1).mean().item()


def _leak(spec: Method, q, k, v, params: dict[str, Any], config: FidelityConfig) -> float:
    """Largest change of an output before the cut (the middle, rounded down to the method's query
    block) when keys, values and queries after it are replaced by large random ones, relative to
    the largest output."""
    n = q.shape[2]
    unit = 1 if spec.query_block is None else spec.query_block(spec.params(**params))
    cut = max(unit, (n // 2) // unit * unit)
    gen = torch.Generator().manual_seed(config.seed + 31)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t, size in ((q2, 30.0), (k2, 30.0), (v2, 1e3)):
        t[:, :, cut:] = size * torch.randn(t[:, :, cut:].shape, generator=gen)
    if spec.shared_query:
        q2 = q
    base = attention(q, k, v, is_causal=True, method=spec.name, **params)
    moved = attention(q2, k2, v2, is_causal=True, method=spec.name, **params)
    past = (moved[:, :, :cut] - base[:, :, :cut]).abs().max().item()
    return past / max(base[:, :, :cut].abs().max().item(), 1e-30)


def _measure(cell: Cell, config: FidelityConfig) -> dict[str, Any]:
    spec, s = get_method(cell.method), cell.shape
    causal, budget = s["causal"], cell.params.get("budget")
    q, k, v = _inputs(cell, config, spec)
    keys = probe.budget_keys(s["N"], s["N"], causal, budget) if budget is not None else None
    params = run_params(spec, q, k, v, causal, keys, config.seed)
    out = attention(q, k, v, is_causal=causal, method=spec.name, **params)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    exact = attention(q64, k64, v64, is_causal=causal, method="dense", backend="reference")
    per_head = _relative_errors(out, exact)
    values: dict[str, Any] = {
        "status": "ok" if torch.isfinite(out).all() else "error",
        "family": spec.family,
        "budget": budget,
        "keys": keys,
        "params": describe_params(params),
        "rel_error": per_head.mean().item(),
        "rel_error_per_head": [round(x, 6) for x in per_head.tolist()],
        "cosine": _cosine(out, exact),
        "density": None,
        "recall": None,
        "leak": None,
    }
    if values["status"] == "error":
        values["message"] = "non-finite output"
    if budget is not None:
        weights = probe.attention_weights(spec.name, q, k, is_causal=causal, params=params)
        exact_weights = probe.attention_weights("dense", q64, k64, is_causal=causal)
        values["density"] = probe.density(weights, causal)
        values["recall"] = probe.mass_recall(weights, exact_weights).mean().item()
    if causal and spec.capabilities.causal:
        values["leak"] = _leak(spec, q, k, v, params, config)
    return values


def measure(cell: Cell, config: FidelityConfig) -> dict[str, Any]:
    """Measure one fidelity cell; a method that cannot run it is stored as ``"unsupported"``."""
    base = {"family": get_method(cell.method).family, "budget": cell.params.get("budget")}
    try:
        return {**base, **_measure(cell, config)}
    except NoBackendError as error:
        return {**base, "status": "unsupported", "message": str(error)[:2000]}
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        return {**base, "status": "error", "message": f"{type(error).__name__}: {error}"[:2000]}


def unavailable(cell: Cell) -> str | None:
    """Why a cell's source cannot be loaded here (MiniLM not installed), else None."""
    return data.available() if cell.shape["source"] == MINILM else None
