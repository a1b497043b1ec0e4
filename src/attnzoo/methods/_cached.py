"""Decoding by recomputation over a token cache, for causal methods with no incremental form.

Two decoders, both exact by construction:

* :func:`cached_decoder`: the state keeps every key and value (and, for methods whose rows mix
  queries, every query). A step appends the new tokens and runs the method's own dispatch on
  the whole cache as self-attention, the earlier queries replaced by zeros when rows are
  independent (:attr:`Method.rows_independent`), and returns the last rows. Causality makes the
  last rows of that call the rows of causal attention over everything seen so far; methods whose
  rows never depend on the length (every method given this decoder except the query-block ones)
  thus equal causal attention over the whole sequence. Cost: one run of the method per step.
  Two hooks keep it exact where a plain run could not be: ``min_len(params)`` pads the cache
  with zero tokens *after* the last one (invisible to every real query under causality) up to the
  shortest input the method accepts (a kernel of 7 needs 7 positions); ``fit(params, length)``
  adapts parameters naming positions (Longformer's global tokens not yet seen). A third,
  ``lookback(params) -> (keys, align)``, bounds the cache of local methods: a future query needs
  at most ``keys`` keys before it, and the cache may only be cut at multiples of ``align``
  (block or stride-group boundaries), which keeps the pattern of the kept positions unchanged.
* :func:`cross_decoder`: keeps every key and value; a step is the method's causal
  (bottom-right aligned) cross call of the new queries over every key (query-block methods).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import select_backend
from ..inputs import AttentionCall, build_call
from ..registry import AttentionOutput, Decoder, get_method
from .dense import KVCache, append_kv, init_kv_cache, kv_cache_size

MinLen = Callable[[Any], int]
Fit = Callable[[Any, int], Any]
Lookback = Callable[[Any], tuple[int, int] | None]


@dataclass(frozen=True)
class TokenCache:
    """Keys `[B, Hkv, n, D]` and values `[B, Hkv, n, Dv]` of the absolute positions
    ``[start, length)``, and the queries `[B, Hq, n, D]` of the same positions when the method's
    rows mix queries (``None`` otherwise, or before the first step)."""

    key: Tensor
    value: Tensor
    query: Tensor | None
    start: int
    length: int

    def size_bytes(self) -> int:
        return self.key.nbytes + self.value.nbytes + (0 if self.query is None else self.query.nbytes)


def check_query(call: AttentionCall, cached: Tensor | None) -> None:
    """The new queries must continue the cached ones: same heads, head size and dtype."""
    if cached is None:
        return
    new = call.query
    if new.shape[:2] != cached.shape[:2] or new.shape[-1] != cached.shape[-1] or new.dtype != cached.dtype:
        raise ValueError(
            f"query {list(new.shape)} {new.dtype} does not match the state's queries "
            f"{list(cached.shape[:2])} x {cached.shape[-1]} {cached.dtype}"
        )


def run_method(name: str, query: Tensor, key: Tensor, value: Tensor, scale: float, params: Any) -> Tensor:
    """Causal attention of ``method`` through its own checks and dispatch (no re-validation of
    ``params``, already validated by ``init_state``/``step``); returns the output."""
    spec = get_method(name)
    call = build_call(
        query, key, value, None, 0.0, True, scale, False, None, False, False, spec.capabilities.spatial_dims
    )
    if spec.check is not None:
        spec.check(call, params)
    return select_backend(spec, call, params).run(call, params).out


def kept_from(length: int, params: Any, min_len: MinLen | None, lookback: Lookback | None) -> int:
    """The first absolute position a cache of ``length`` tokens keeps (0 without ``lookback``)."""
    bound = None if lookback is None else lookback(params)
    if bound is None:
        return 0
    keys, align = bound
    keys = max(keys, 0 if min_len is None else min_len(params))  # never below the shortest run
    return max(0, length - keys) // align * align


def cached_decoder(
    name: str,
    *,
    keep_queries: bool = False,
    min_len: MinLen | None = None,
    fit: Fit | None = None,
    lookback: Lookback | None = None,
    semantics: Callable[[Any], str] = lambda p: "full",
) -> Decoder:
    """The generic decoder of method ``name`` (see the module docstring)."""

    def init(batch, kv_heads, head_dim, value_dim, dtype, device, p) -> TokenCache:
        kv = init_kv_cache(batch, kv_heads, head_dim, value_dim, dtype, device)
        return TokenCache(kv.key, kv.value, None, 0, 0)

    def step(call: AttentionCall, cache: TokenCache, p: Any) -> tuple[AttentionOutput, TokenCache]:
        full, kv = append_kv(call, KVCache(cache.key, cache.value))
        if keep_queries:
            check_query(call, cache.query)
            queries = call.query if cache.query is None else torch.cat([cache.query, call.query], dim=2)
            query = queries
        else:
            queries = None
            earlier = call.query.new_zeros(*call.query.shape[:2], full.kv_len - call.q_len, call.head_dim)
            query = torch.cat([earlier, call.query], dim=2)
        total, length = full.kv_len, cache.length + call.q_len
        pad = 0 if min_len is None else max(0, min_len(p) - total)
        key, value = kv.key, kv.value
        if pad:  # zero tokens after the last: no real query sees them (causal)
            query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        params = p if fit is None else fit(p, length)
        out = run_method(name, query, key, value, call.scale, params)[:, :, total - call.q_len : total]
        start = kept_from(length, p, min_len, lookback)
        cut = start - cache.start
        kept = TokenCache(
            kv.key[:, :, cut:], kv.value[:, :, cut:], None if queries is None else queries[:, :, cut:], start, length
        )
        return AttentionOutput(out), kept

    def size(seq_len: int, kv_heads: int, head_dim: int, value_dim: int, p: Any, query_heads: int) -> int:
        kept = seq_len - kept_from(seq_len, p, min_len, lookback)
        return kept * (kv_heads * (head_dim + value_dim) + (query_heads * head_dim if keep_queries else 0))

    return Decoder(init, step, size, semantics)


def cross_decoder(name: str) -> Decoder:
    """Keep every key and value; a step is the method's causal cross call of the new queries
    over all of them (``"cross"`` semantics)."""

    def step(call: AttentionCall, cache: KVCache, p: Any) -> tuple[AttentionOutput, KVCache]:
        full, cache = append_kv(call, cache)
        return AttentionOutput(run_method(name, full.query, full.key, full.value, full.scale, p)), cache

    return Decoder(init_kv_cache, step, kv_cache_size, lambda p: "cross")


__all__ = ["TokenCache", "cached_decoder", "check_query", "cross_decoder", "kv_cache_size", "run_method"]
