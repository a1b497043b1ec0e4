"""attnzoo methods inside Hugging Face transformers models, through its attention registry.

    >>> from attnzoo.integrations.transformers import register
    >>> name = register("attnzoo_moba", "moba", block_size=64, top_k=4)
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    >>> model.set_attn_implementation("sdpa")  # and back

:func:`register` installs two functions under ``name``: the attention function
(``AttentionInterface``) and the mask function (``AttentionMaskInterface``). Without the second,
transformers silently passes ``attention_mask=None`` and padding disappears; ours returns a
compact :class:`~attnzoo.integrations.hf_masks.MaskSpec` (padding, offsets, causal or
bidirectional, sliding window) so no ``Lq x Lk`` mask is built.

The attention function honours grouped-query attention (key/value heads are never repeated), the
``scaling`` the model passes, ``is_causal`` (the keyword, else ``module.is_causal``), the model's
``sliding_window`` (``dense`` runs attnzoo's ``sliding_window`` there), padding, and decoding with
a KV cache: the queries are the last positions of the keys. Methods with cross-attention
support run such calls directly; methods whose rows are independent
(:attr:`attnzoo.Method.rows_independent`) run on the full key length with the earlier queries
zeroed, and their last rows are returned. Whatever a method cannot do -- ``softcap``, attention
sinks (``s_aux``), dropout, a sliding window it cannot honour, decoding a method that needs the
earlier queries, a mask pattern that is not recognised -- is served by exact attention instead
(SDPA, or eager math for softcap and sinks), logged once per name and reason and counted in
:func:`fallbacks`; with ``strict=True`` it raises :class:`FallbackRefused`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..api import attention
from ..errors import NoBackendError
from ..inputs import build_call
from ..registry import Method, get_method
from .hf_masks import MaskSpec, eager_attention, mask_descriptor

logger = logging.getLogger(__name__)

# block_sparse's layout and mask_mod index the call's own query rows (FlexAttention's convention),
# so a decode call (queries = the last key positions) is served like a method without cross
# attention: the full length with the earlier queries zeroed
_CALL_RELATIVE_QUERIES = frozenset({"block_sparse"})

_REGISTERED: dict[str, Binding] = {}
_FALLBACKS: dict[str, Counter] = {}
_LOGGED: set[tuple[str, str]] = set()


class FallbackRefused(RuntimeError):
    """A ``strict=True`` registration met a call its method cannot serve."""


@dataclasses.dataclass(frozen=True)
class Binding:
    """What a registered name runs: the method, its fixed parameters, the budget fraction
    (per-call parameters from ``method.budget``) and whether fallbacks are refused."""

    name: str
    method: Method
    params: dict[str, Any]
    budget: float | None
    strict: bool


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if "/" in name or ":" in name:
        raise ValueError(
            f"name must not contain '/' or ':' (transformers reads such a name as a Hub kernel "
            f"'org/repo:function' and tries to download it), got {name!r}"
        )
    from transformers import AttentionInterface

    if name in AttentionInterface._global_mapping and name not in _REGISTERED:
        raise ValueError(
            f"name {name!r} is already an attention implementation of transformers or another library; "
            "choose another name (e.g. 'attnzoo_<method>')"
        )
    return name


def register(name: str, method: str = "dense", *, budget: float | None = None, strict: bool = False, **params: Any):
    """Register ``method`` with transformers under ``name``; returns ``name``.

    Args:
        name: the ``attn_implementation`` to pass to ``from_pretrained`` or
            ``model.set_attn_implementation``; no ``/`` or ``:``. Registering a name again
            replaces its binding.
        method: a registered attnzoo method. Default: `"dense"` (identical to ``sdpa``).
        budget: for sparse methods, the fraction in `(0, 1]` of the allowed (query, key) pairs to
            attend: each call's parameters come from ``method.budget(call, keys)``. Default: `None`.
        strict: raise :class:`FallbackRefused` instead of falling back to exact attention.
            Default: `False`.
        **params: the method's parameters (validated now).

    Raises:
        ValueError: a bad name, an unknown method, parameters the method rejects, a budget outside
            `(0, 1]` or on a method without one; ``ImportError`` without transformers.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    name = _check_name(name)
    spec = get_method(method)
    spec.params.from_kwargs(spec.name, params)  # unknown or invalid parameters fail here
    if budget is not None:
        if spec.budget is None:
            raise ValueError(f"budget: method {spec.name!r} has no budget (it is not a sparse method)")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
        budget = float(budget)
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be a bool, got {strict!r}")
    binding = Binding(name, spec, dict(params), budget, strict)
    _REGISTERED[name] = binding
    _FALLBACKS[name] = Counter()
    AttentionInterface.register(name, _attention_function(binding))
    AttentionMaskInterface.register(name, mask_descriptor)
    return name


def unregister(name: str) -> None:
    """Remove a name :func:`register` installed (models using it must switch first)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    if name not in _REGISTERED:
        raise ValueError(f"name {name!r} was not registered by attnzoo; registered: {sorted(_REGISTERED)}")
    del _REGISTERED[name]
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def fallbacks(name: str) -> dict[str, int]:
    """Calls of ``name`` served by exact attention instead of its method, per reason."""
    if name not in _FALLBACKS:
        raise ValueError(f"name {name!r} was not registered by attnzoo; registered: {sorted(_REGISTERED)}")
    return dict(_FALLBACKS[name])


def _check_layout(query: Any, key: Any, value: Any) -> None:
    for arg, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor) or tensor.ndim != 4:
            shape = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{arg}: expected a 4-D tensor (B, heads, length, head_dim) from the model, got {shape}")
    if key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query/key/value: shapes {list(query.shape)}, {list(key.shape)}, {list(value.shape)} are not "
            "(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"key: {key.shape[1]} key/value heads do not divide {query.shape[1]} query heads")


@dataclasses.dataclass
class _Call:
    """One model call in attnzoo's terms."""

    causal: bool
    window: int | None
    padding: Tensor | None
    dense_mask: Tensor | None
    scale: float
    dropout: float


def _read_call(module: Any, query: Tensor, key: Tensor, mask: Any, scaling: Any, dropout: float, kwargs: dict):
    """The call's pattern, and a reason to fall back when the mask cannot be served compactly."""
    forced = kwargs.get("is_causal")
    causal = bool(forced if forced is not None else getattr(module, "is_causal", False))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    call = _Call(causal, kwargs.get("sliding_window"), None, None, scale, float(dropout))
    lq, lk = query.shape[2], key.shape[2]
    if mask is None:
        return call, None
    if isinstance(mask, Tensor):
        call.dense_mask = mask
        return call, "a dense attention_mask (the mask function of another implementation)"
    if not isinstance(mask, MaskSpec):
        raise TypeError(f"attention_mask: expected None, a tensor or a MaskSpec, got {type(mask).__name__}")
    if (mask.q_length, mask.kv_length) != (lq, lk):
        raise ValueError(
            f"attention_mask: describes {mask.q_length} queries x {mask.kv_length} keys, the call has {lq} x {lk}"
        )
    call.causal, call.padding = mask.causal, mask.padding
    if mask.window is not None:
        call.window = mask.window
    if mask.dense is not None:
        call.dense_mask = mask.dense
        return call, "a mask pattern attnzoo does not recognise (packed sequences, chunked or custom overlays)"
    if mask.q_offset + lq != mask.kv_offset + lk:
        call.dense_mask = mask.to_bool(query.shape[0], query.device)
        return call, "queries that are not the last positions of the keys"
    return call, None


def _route(b: Binding, call: _Call, query: Tensor, key: Tensor, kwargs: dict) -> tuple[Method, dict, str | None]:
    """The method and fixed parameters that serve the call, or a reason to fall back."""
    spec, params = b.method, dict(b.params)
    caps = spec.capabilities
    if kwargs.get("softcap") is not None:
        return spec, params, "softcap"
    if kwargs.get("s_aux") is not None:
        return spec, params, "attention sinks (s_aux)"
    if call.dropout > 0 and not caps.dropout:
        return spec, params, "attention dropout (training)"
    if call.window is not None:
        model_window = (call.window - 1, 0) if call.causal else (call.window, call.window)
        if spec.name == "dense":
            spec, params = get_method("sliding_window"), {"window": model_window}
        elif spec.name == "sliding_window":
            # the method's own window (default included) inside the model's
            mine = spec.params.from_kwargs(spec.name, params).window
            params["window"] = tuple(m if w is None else min(w, m) for w, m in zip(mine, model_window, strict=True))
        else:
            return spec, params, f"the model's sliding_window={call.window} ({spec.name} cannot honour it)"
    if call.causal and not caps.causal:
        return spec, params, f"causal attention ({spec.name} is non-causal only)"
    if not call.causal and not caps.noncausal:
        return spec, params, f"bidirectional attention ({spec.name} is causal only)"
    lq, lk = query.shape[2], key.shape[2]
    if lq != lk and not _served_as_cross(spec):
        if not call.causal:
            return spec, params, f"cross attention ({spec.name} needs as many keys as queries)"
        if not spec.rows_independent:
            return spec, params, f"decoding with a KV cache ({spec.name} needs the earlier queries, not kept)"
    return spec, params, None


def _served_as_cross(spec: Method) -> bool:
    return spec.capabilities.cross and spec.name not in _CALL_RELATIVE_QUERIES


def decode_route(spec: Method) -> str:
    """How a call whose queries are the last positions of a longer KV cache is served (the
    generated method docs quote it)."""
    if _served_as_cross(spec):
        return "served directly (queries aligned bottom-right)"
    if spec.rows_independent:
        return "served over the whole cache with the earlier queries zeroed, keeping the last rows (exact)"
    return "falls back to exact attention (the method needs the earlier queries, which the cache does not keep)"


def _run_method(spec: Method, params: dict, b: Binding, call: _Call, query: Tensor, key: Tensor, value: Tensor):
    lq, lk = query.shape[2], key.shape[2]
    if lq != lk and not _served_as_cross(spec):
        # rows are independent: compute the full length with the earlier queries zeroed
        padded = query.new_zeros(*query.shape[:2], lk, query.shape[3])
        padded[:, :, lk - lq :] = query
        query = padded
    dims = spec.capabilities.spatial_dims

    def described(q: Tensor):
        return build_call(
            q, key, value, None, call.dropout, call.causal, call.scale, False, call.padding, False, False, dims
        )

    shaped = described(query)
    per_call: dict[str, Any] = {}
    if spec.call_params is not None:
        per_call.update(spec.call_params(shaped))
    if b.budget is not None and spec is b.method:
        from ..arena.probe import budget_keys

        # the budget of the whole sequence so far, so that prefill and decode at one length agree
        whole = described(query[:, :, :1].expand(*query.shape[:2], lk, query.shape[3]))
        per_call.update(spec.budget(whole, budget_keys(lk, lk, call.causal, b.budget)))
    out = attention(
        query,
        key,
        value,
        dropout_p=call.dropout,
        is_causal=call.causal,
        scale=call.scale,
        kv_mask=call.padding,
        method=spec.name,
        **{**per_call, **params},
    )
    return out[:, :, out.shape[2] - lq :]


def _exact(call: _Call, query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> Tensor:
    """Exact attention for a fallback: eager math for softcap/sinks, else SDPA (or attnzoo's exact
    sliding window, which equals SDPA with the window mask without building it)."""
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is not None or sinks is not None or call.dense_mask is not None:
        allowed = call.dense_mask
        if allowed is None:
            lq, lk = query.shape[2], key.shape[2]
            pattern = MaskSpec(call.padding, lk - lq, 0, lq, lk, call.causal, call.window)
            allowed = pattern.to_bool(query.shape[0], query.device)
        if allowed.dtype != torch.bool:
            raise ValueError(f"attention_mask: expected a bool mask, got {allowed.dtype}")
        if softcap is None and sinks is None:
            groups = query.shape[1] // key.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                attn_mask=allowed, dropout_p=call.dropout, scale=call.scale,
            )  # fmt: skip
        return eager_attention(query, key, value, allowed, call.scale, softcap, sinks)
    params: dict[str, Any] = {}
    method = "dense"
    if call.window is not None:
        method = "sliding_window"
        params["window"] = (call.window - 1, 0) if call.causal else (call.window, call.window)
    return attention(
        query, key, value, dropout_p=call.dropout, is_causal=call.causal, scale=call.scale,
        kv_mask=call.padding, method=method, **params,
    )  # fmt: skip


def _fall_back(b: Binding, reason: str) -> None:
    if b.strict:
        raise FallbackRefused(f"{b.name} ({b.method.name}, strict=True) cannot serve this call: {reason}")
    _FALLBACKS[b.name][reason] += 1
    if (b.name, reason) not in _LOGGED:
        _LOGGED.add((b.name, reason))
        logger.warning("attnzoo %s (%s): exact attention serves %s", b.name, b.method.name, reason)


def _attention_function(b: Binding) -> Callable:
    def attnzoo_attention(
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention-function contract: ``query [B, Hq, Lq, D]``, ``key``/``value
        [B, Hkv, Lk, D]`` (queries are the last ``Lq`` key positions); returns
        ``([B, Lq, Hq, Dv], None)``."""
        _check_layout(query, key, value)
        call, reason = _read_call(module, query, key, attention_mask, scaling, dropout, kwargs)
        spec, params = b.method, b.params
        if reason is None:
            spec, params, reason = _route(b, call, query, key, kwargs)
        out = None
        if reason is None:
            try:
                out = _run_method(spec, params, b, call, query, key, value)
            except NoBackendError as error:
                reason = f"inputs no backend of {spec.name} runs ({str(error).splitlines()[0]})"
        if out is None:
            _fall_back(b, reason)
            out = _exact(call, query, key, value, kwargs)
        return out.transpose(1, 2).contiguous(), None

    attnzoo_attention.__qualname__ = f"attnzoo_attention[{b.name}]"
    return attnzoo_attention


__all__ = ["FallbackRefused", "MaskSpec", "decode_route", "fallbacks", "register", "unregister"]
