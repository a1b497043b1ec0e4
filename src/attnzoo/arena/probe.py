"""The attention-weights probe: the effective ``[Nq, Nk]`` attention matrix of any method whose
output is linear in the values, and the sparsity measures the fidelity suite reports.

A method's output is ``out = W(q, k) @ v`` whenever its weights depend on the queries and keys
only (softmax methods, dense or sparse, content-selected or not; linear attention; pooled
methods such as ``cca``, whose cores are weighted sums of the values). Running it on one-hot
values reads ``W`` column by column: with ``v = I[:, c0 : c0 + w]`` the output is
``W[..., c0 : c0 + w]``. The columns go in chunks of the query head size, a value width every
method accepts.

Budgets are counted in *allowed* pairs: every ``(i, j)`` for non-causal attention, and
``j <= i + Nk - Nq`` (bottom-right aligned, as everywhere in attnzoo) for causal attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..api import attention

__all__ = ["allowed_pairs", "attention_weights", "budget_keys", "density", "mass_recall"]


def _check_lengths(n_q: int, n_k: int) -> None:
    for name, value in (("n_q", n_q), ("n_k", n_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def allowed_pairs(n_q: int, n_k: int, is_causal: bool) -> Tensor:
    """Bool ``[Nq, Nk]``: the (query, key) pairs attention may use; causal is bottom-right aligned
    (query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq``)."""
    _check_lengths(n_q, n_k)
    if not is_causal:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    return j <= i + (n_k - n_q)


def _allowed_count(n_q: int, n_k: int, is_causal: bool) -> int:
    """``allowed_pairs(n_q, n_k, is_causal).sum()`` in O(Nq) memory."""
    if not is_causal:
        return n_q * n_k
    return int(torch.clamp(torch.arange(n_q) + (n_k - n_q) + 1, 0, n_k).sum())


def budget_keys(n_q: int, n_k: int, is_causal: bool, fraction: float) -> int:
    """Keys per query (on average over the queries) that make ``fraction`` of the allowed pairs:
    ``round(fraction * allowed / Nq)``, at least 1. Causal ``N = 512``, ``fraction = 1/2``: 128."""
    _check_lengths(n_q, n_k)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    return max(1, math.floor(fraction * _allowed_count(n_q, n_k, is_causal) / n_q + 0.5))


def attention_weights(
    method: str,
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool,
    params: dict[str, Any] | None = None,
    backend: str | None = None,
) -> Tensor:
    """The effective attention matrix of ``method`` on ``q`` and ``k``: ``W [B, Hq, Nq, Nk]`` with
    ``attention(q, k, v, ...) == W @ v`` (``v`` flattened to ``[B, Hkv, Nk, Dv]``) for every ``v``.

    Args:
        method: a registered method name whose output is linear in the values.
        q: `[B, Hq, Nq, D]` (spatial methods: `[B, Hq, *spatial, D]`); ``W`` is in its dtype.
        k: `[B, Hkv, Nk, D]` (spatial: `[B, Hkv, *spatial, D]`).
        is_causal: passed to the method.
        params: the method's parameters. Default: `None` (its defaults).
        backend: force a backend (``"reference"``: the dense reference). Default: `None`.

    Runs the method ``ceil(Nk / D)`` times on one-hot values of width ``D`` (the last chunk
    narrower). Example: ``attention_weights("sliding_window", q, k, is_causal=True,
    params={"window": (63, 0)})``.
    """
    if not isinstance(q, Tensor) or not isinstance(k, Tensor):
        raise TypeError(f"q and k must be tensors, got {type(q).__name__} and {type(k).__name__}")
    if q.dim() < 4 or k.dim() != q.dim():
        raise ValueError(
            f"q and k must have the layout [B, H, N, D] (spatial: [B, H, *spatial, D]) and the same rank, "
            f"got shapes {list(q.shape)} and {list(k.shape)}"
        )
    params = dict(params or {})
    batch, kv_heads, spatial, width = k.shape[0], k.shape[1], k.shape[2:-1], q.shape[-1]
    n_k = math.prod(spatial)
    eye = torch.eye(n_k, dtype=q.dtype, device=q.device)
    columns = []
    for start in range(0, n_k, width):
        one_hot = eye[:, start : start + width]  # [Nk, w]: column c is key start + c
        v = one_hot.reshape(*spatial, one_hot.shape[-1]).expand(batch, kv_heads, *spatial, one_hot.shape[-1])
        with torch.no_grad():
            out = attention(q, k, v, is_causal=is_causal, method=method, backend=backend, **params)
        columns.append(out.reshape(out.shape[0], out.shape[1], -1, out.shape[-1]))  # [B, Hq, Nq, w]
    return torch.cat(columns, dim=-1)


def density(weights: Tensor, is_causal: bool) -> float:
    """Fraction of the allowed (query, key) pairs with a nonzero weight, over every batch element
    and head of ``weights [B, H, Nq, Nk]``."""
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        raise ValueError(f"weights must be a [B, H, Nq, Nk] tensor, got {getattr(weights, 'shape', weights)!r}")
    allowed = allowed_pairs(weights.shape[2], weights.shape[3], is_causal).to(weights.device)
    used = ((weights != 0) & allowed).sum()
    return float(used) / (weights.shape[0] * weights.shape[1] * float(allowed.sum()))


def mass_recall(weights: Tensor, exact_weights: Tensor) -> Tensor:
    """``[B, H]``: mean over the queries of the exact attention mass that falls on the method's
    support (the keys where ``weights [B, H, Nq, Nk]`` is nonzero); ``exact_weights`` has the same
    shape (dense attention's weights). 1 where the method keeps every key of nonzero exact weight."""
    if not isinstance(weights, Tensor) or not isinstance(exact_weights, Tensor):
        raise TypeError("weights and exact_weights must be tensors")
    if weights.dim() != 4 or weights.shape != exact_weights.shape:
        raise ValueError(
            f"weights and exact_weights must both be [B, H, Nq, Nk] of the same shape, "
            f"got {list(weights.shape)} and {list(exact_weights.shape)}"
        )
    return (exact_weights * (weights != 0)).sum(-1).mean(-1)
