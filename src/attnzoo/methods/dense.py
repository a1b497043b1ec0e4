"""``dense``: exact softmax attention, the drop-in for ``F.scaled_dot_product_attention``.

Backends, in dispatch order:

* ``sdpa``: PyTorch's SDPA (a fused flash kernel with O(N) memory on CPU); bitwise SDPA.
* ``tiled``: online softmax over key blocks in plain PyTorch with its own backward; O(N * block)
  extra memory whatever the masks, so it takes over when SDPA would need a large dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..api import select_backend
from ..inputs import AttentionCall, build_call
from ..kernels.lse import merge_attention_states
from ..kernels.masks import dense_visibility
from ..kernels.reference import softmax_reference
from ..kernels.sdpa import sdpa_attention, sdpa_reasons
from ..kernels.tiled import tiled_attention
from ..params import MethodParams
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register

SPLIT_KV_THRESHOLD = 4096  # decode: cached keys per split-KV chunk, and the cache length that turns it on


@dataclass(frozen=True)
class DenseParams(MethodParams):
    """Exact attention takes no parameters."""


def reference(call: AttentionCall, params: DenseParams) -> AttentionOutput:
    """softmax(q k^T * scale + attn_mask, hidden keys removed) @ v, every score materialised."""
    out, lse = softmax_reference(call, dense_visibility(call), float_mask(call))
    return AttentionOutput(out, lse if call.return_lse else None)


def float_mask(call: AttentionCall) -> Tensor | None:
    """The call's ``attn_mask`` when it is a float bias (added to the scores), else None."""
    mask = call.attn_mask
    return mask if mask is not None and mask.dtype != torch.bool else None


def bool_mask(call: AttentionCall) -> Tensor | None:
    """The call's ``attn_mask`` when it is boolean (True: visible), else None."""
    mask = call.attn_mask
    return mask if mask is not None and mask.dtype == torch.bool else None


def _run_sdpa(call: AttentionCall, params: DenseParams) -> AttentionOutput:
    return AttentionOutput(*sdpa_attention(call))


def _run_tiled(call: AttentionCall, params: DenseParams) -> AttentionOutput:
    out, lse = tiled_attention(
        call.query,
        call.key,
        call.value,
        scale=call.scale,
        is_causal=call.is_causal,
        kv_mask=call.kv_mask,
        mask=bool_mask(call),
        bias=float_mask(call),
    )
    return AttentionOutput(out, lse if call.return_lse else None)


@dataclass(frozen=True)
class KVCache:
    """Every key and value seen so far, `[B, Hkv, n, D]` and `[B, Hkv, n, Dv]`."""

    key: Tensor
    value: Tensor

    def size_bytes(self) -> int:
        return self.key.nbytes + self.value.nbytes


def init_kv_cache(batch, kv_heads, head_dim, value_dim, dtype, device, params=None) -> KVCache:
    """An empty KV cache (decoders that keep every key and value)."""
    return KVCache(
        torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device),
    )


def check_kv(call: AttentionCall, key: Tensor, value: Tensor) -> None:
    """A decode step's keys and values must continue the state's `key [B, Hkv, n, D]` and
    `value [B, Hkv, n, Dv]`: same batch, heads, head sizes, dtype and device."""
    for name, new, old in (("key", call.key, key), ("value", call.value, value)):
        same = new.shape[:2] == old.shape[:2] and new.shape[-1] == old.shape[-1] and new.dtype == old.dtype
        if not same or new.device != old.device:
            raise ValueError(
                f"{name} {list(new.shape)} {new.dtype} on {new.device} does not match the state's "
                f"{list(old.shape[:2])} x {old.shape[-1]} {old.dtype} on {old.device}"
            )


def append_kv(call: AttentionCall, cache: KVCache) -> tuple[AttentionCall, KVCache]:
    """Append a decode step's keys and values to the cache (checked against it); returns the call
    over every cached key (bottom-right causal alignment puts the new queries last) and the cache."""
    check_kv(call, cache.key, cache.value)
    cache = KVCache(torch.cat([cache.key, call.key], dim=2), torch.cat([cache.value, call.value], dim=2))
    return call.replace(key=cache.key, value=cache.value, kv_len=cache.key.shape[2]), cache


def kv_cache_size(seq_len: int, kv_heads: int, head_dim: int, value_dim: int, params, query_heads: int) -> int:
    """``Decoder.state_size`` of a cache of every key and value: elements per batch row."""
    return seq_len * kv_heads * (head_dim + value_dim)


def _step(call: AttentionCall, cache: KVCache, params: DenseParams) -> tuple[AttentionOutput, KVCache]:
    """Append the new keys and values, then attend with bottom-right causal alignment; past
    :data:`SPLIT_KV_THRESHOLD` cached keys, split-KV (:func:`split_kv_attention`)."""
    old = cache.key.shape[2]
    full, cache = append_kv(call, cache)
    if old > SPLIT_KV_THRESHOLD:
        return AttentionOutput(split_kv_attention(full, old, params)), cache
    backend = select_backend(DENSE, full, params)  # the same dispatch as attention(): tiled past the mask limit
    return backend.run(full, params), cache


def _part(query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool, params: DenseParams):
    """``(out, lse)`` of one part of the keys through dense dispatch."""
    part = build_call(query, key, value, None, 0.0, causal, scale, False, None, True, False)
    result = select_backend(DENSE, part, params).run(part, params)
    return result.out, result.lse


def split_kv_attention(call: AttentionCall, old: int, params: DenseParams) -> Tensor:
    """Causal attention of the call's ``n`` new queries over ``old`` cached keys followed by the
    ``n`` new keys (``call.key [B, Hkv, old + n, D]``), the cached keys split into chunks of
    :data:`SPLIT_KV_THRESHOLD`, merged exactly by log-sum-exp (flash-decoding's split-KV).

    Every cached key is visible to every new query, so the chunks need no mask, and the query
    heads of a key/value head are packed as rows: `[B, Hq, n, D]` viewed as `[B, Hkv, G * n, D]`,
    one matmul per key/value head, no repeated keys. The new keys are one causal (square) part.
    Returns `[B, Hq, n, Dv]`."""
    B, Hq, n, D = call.query.shape
    packed = call.query.reshape(B, call.kv_heads, call.groups * n, D)
    outs, lses = [], []
    for lo in range(0, old, SPLIT_KV_THRESHOLD):
        hi = min(lo + SPLIT_KV_THRESHOLD, old)
        out, lse = _part(packed, call.key[:, :, lo:hi], call.value[:, :, lo:hi], call.scale, False, params)
        outs.append(out.reshape(B, Hq, n, call.value_dim))
        lses.append(lse.reshape(B, Hq, n))
    out, lse = _part(call.query, call.key[:, :, old:], call.value[:, :, old:], call.scale, True, params)
    return merge_attention_states([*outs, out], [*lses, lse])[0]


def _tiled_reasons(call: AttentionCall, params: DenseParams) -> list[str]:
    reasons = []
    if call.dropout_p > 0:
        reasons.append("dropout_p > 0 is not implemented (sdpa supports it)")
    if call.attn_mask is not None and call.attn_mask.requires_grad:
        reasons.append("attn_mask requires grad; this backward gives no mask gradient")
    return reasons


DENSE = register(
    Method(
        name="dense",
        family="exact",
        exact=True,
        summary=(
            "Exact softmax attention, softmax(QK^T/sqrt(d))V. Dispatches to PyTorch's fused SDPA kernel; "
            "a plain-PyTorch tiled online-softmax kernel (FlashAttention's recurrence, with its own "
            "backward) takes over where SDPA would need a large dense mask."
        ),
        paper=Paper(
            "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness (Dao et al., 2022)",
            "https://arxiv.org/abs/2205.14135",
        ),
        capabilities=Capabilities(
            causal=True,
            noncausal=True,
            cross=True,
            gqa=True,
            kv_mask=True,
            attn_mask=True,
            dropout=True,
            lse=True,
            decode=True,
        ),
        params=DenseParams,
        reference=reference,
        decoder=Decoder(init_kv_cache, _step, kv_cache_size),
        backends=(
            Backend("sdpa", _run_sdpa, sdpa_reasons, description="torch.nn.functional.scaled_dot_product_attention"),
            Backend("tiled", _run_tiled, _tiled_reasons, description="online softmax over key blocks, plain PyTorch"),
        ),
    )
)

__all__ = ["DENSE", "DenseParams"]
