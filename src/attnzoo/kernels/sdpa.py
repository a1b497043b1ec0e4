"""Dense attention through ``torch.nn.functional.scaled_dot_product_attention``.

Without ``return_lse`` the call goes to SDPA unchanged, so results are bitwise SDPA's. The
masks SDPA lacks are built as small broadcastable tensors: ``kv_mask`` as ``[B, 1, 1, Nk]``;
bottom-right causal alignment (``Nq != Nk``) or causal combined with another mask as a dense
``[Nq, Nk]`` mask, refused past :data:`DENSE_MASK_LIMIT_BYTES` so dispatch moves on to a
tiled backend instead of allocating gigabytes.

With ``return_lse`` on the CPU, the fused flash kernel that SDPA itself dispatches to is
called directly: it returns the log-sum-exp. Its log-sum-exp has no gradient in PyTorch, so
:class:`_FlashWithLSE` adds it exactly: with ``g`` the gradient of ``lse``,
``dq_i += scale * g_i * sum_j p_ij k_j`` (attention of q over keys with values ``k``) and
``dk_j += scale * sum_i g_i p_ij q_i`` (the value-gradient of that attention for grad ``g * q``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..inputs import AttentionCall
from .masks import dense_bias, dense_visibility

DENSE_MASK_LIMIT_BYTES = 256 * 2**20

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _native_causal(call: AttentionCall) -> bool:
    """Whether SDPA's own (top-left) ``is_causal`` is the requested mask. Not with ``scale == 0``:
    the CPU flash kernel then returns NaN (masked scores times 0), while an explicit mask works."""
    aligned = call.q_len == call.kv_len and call.kv_mask is None and call.attn_mask is None
    return call.is_causal and aligned and call.scale != 0.0


def _built_mask_bytes(call: AttentionCall) -> int:
    """Bytes of the dense mask this backend must build (SDPA turns it into a float mask)."""
    if not call.is_causal or _native_causal(call):
        return 0
    batch = call.batch if call.kv_mask is not None else 1
    if call.attn_mask is not None:
        batch = max(batch, call.attn_mask.shape[0])
    heads = call.attn_mask.shape[1] if call.attn_mask is not None else 1
    return batch * heads * call.q_len * call.kv_len * (1 + call.query.element_size())


def sdpa_reasons(call: AttentionCall, params: object) -> list[str]:
    reasons = []
    size = _built_mask_bytes(call)
    if size > DENSE_MASK_LIMIT_BYTES:
        reasons.append(
            f"is_causal with Nq != Nk or with another mask needs a dense mask of {size / 2**20:.0f} MiB "
            f"(limit {DENSE_MASK_LIMIT_BYTES // 2**20} MiB)"
        )
    if call.return_lse:
        if call.device.type != "cpu":
            reasons.append(f"return_lse needs the CPU flash kernel, inputs are on {call.device.type}")
        if call.dropout_p > 0:
            reasons.append("return_lse with dropout_p > 0: the flash kernel has no dropout")
        if call.value_dim != call.head_dim:
            reasons.append(
                f"return_lse needs value head size == query head size, got {call.value_dim} and {call.head_dim}"
            )
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            reasons.append("return_lse with an attn_mask that requires grad")
    return reasons


def sdpa_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``call`` on SDPA; returns ``(out, lse or None)``."""
    if call.return_lse:
        return _sdpa_with_lse(call)
    if _native_causal(call) or (call.kv_mask is None and not call.is_causal):
        mask = call.attn_mask
    elif call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        mask = dense_bias(call)
    else:
        mask = dense_visibility(call)
    out = F.scaled_dot_product_attention(
        call.query,
        call.key,
        call.value,
        attn_mask=mask,
        dropout_p=call.dropout_p,
        is_causal=_native_causal(call),
        scale=call.scale,
        enable_gqa=call.q_heads != call.kv_heads,
    )
    return out, None


def _sdpa_with_lse(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    native = _native_causal(call)
    bias = None if native else dense_bias(call)
    empty = None if bias is None else torch.isneginf(bias).all(dim=-1)  # (B|1, H|1, Nq|1)
    out, lse = _FlashWithLSE.apply(call.query, call.key, call.value, bias, native, call.scale)
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


class _FlashWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, is_causal, scale):
        out, lse = _flash_cpu(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, bias = ctx.saved_tensors
        kwargs = dict(attn_mask=bias, scale=ctx.scale)
        if grad_out is not None:
            dq, dk, dv = _flash_cpu_backward(grad_out.contiguous(), q, k, v, out, lse, 0.0, ctx.is_causal, **kwargs)
        else:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if grad_lse is not None:
            g = grad_lse.masked_fill(~torch.isfinite(grad_lse), 0.0)[..., None]  # (B, Hq, Nq, 1)
            attended_keys, _ = _flash_cpu(q, k, k, 0.0, ctx.is_causal, **kwargs)  # sum_j p_ij k_j
            dq = dq + (ctx.scale * g * attended_keys.to(g.dtype)).to(dq.dtype)
            _, _, dk_extra = _flash_cpu_backward(
                (g * q.to(g.dtype)).to(q.dtype), q, k, k, attended_keys, lse, 0.0, ctx.is_causal, **kwargs
            )
            dk = dk + ctx.scale * dk_extra
        return dq, dk, dv, None, None, None
