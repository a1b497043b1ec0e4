"""A table of invalid calls, generated per method from its capabilities and parameters.

Each entry must raise ``error`` (``ValueError`` or ``TypeError``) whose message names
``argument``, before any backend runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import Method
from .cases import sampled_params

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class BadInput:
    name: str
    argument: str
    error: type[Exception]
    build: Callable[[], Call]


def _base(spec: Method, n: int = 16, heads: int = 2) -> Call:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, 8, generator=gen) for _ in range(3))
    q = q[:, :, :1].expand_as(q).clone() if spec.shared_query else q
    # the method's first test parameters: a valid call (block_sparse, say, has no usable defaults)
    kwargs = {"is_causal": not spec.capabilities.noncausal, "method": spec.name, **spec.test_params[0]}
    return (q, k, v), {**kwargs, **sampled_params(spec, q, k, v, 0)}


def _with(spec: Method, index: int | None = None, tensor: Any = None, **kwargs: Any) -> Callable[[], Call]:
    def build() -> Call:
        args, base_kwargs = _base(spec)
        args = list(args)
        if index is not None:
            args[index] = tensor(args) if callable(tensor) else tensor
        return tuple(args), {**base_kwargs, **kwargs}

    return build


def bad_inputs(spec: Method) -> list[BadInput]:
    """Every invalid call for ``spec``: shapes, dtypes, devices, arguments, parameters, capabilities."""
    q_of = lambda transform: lambda args: transform(args)  # noqa: E731
    table = [
        BadInput("query not a tensor", "query", TypeError, _with(spec, 0, [[1.0]])),
        BadInput("key not a tensor", "key", TypeError, _with(spec, 1, 3.0)),
        BadInput("query rank 3", "query", ValueError, _with(spec, 0, q_of(lambda a: a[0][0]))),
        BadInput("value rank 5", "value", ValueError, _with(spec, 2, q_of(lambda a: a[2][None]))),
        BadInput("integer query", "query", TypeError, _with(spec, 0, q_of(lambda a: a[0].long()))),
        BadInput("key dtype differs", "key", TypeError, _with(spec, 1, q_of(lambda a: a[1].double()))),
        BadInput("value dtype differs", "value", TypeError, _with(spec, 2, q_of(lambda a: a[2].half()))),
        BadInput("key batch differs", "key", ValueError, _with(spec, 1, q_of(lambda a: a[1][:1]))),
        BadInput("value heads differ from key", "value", ValueError, _with(spec, 2, q_of(lambda a: a[2][:, :1]))),
        BadInput(
            "query heads not a multiple",
            "query",
            ValueError,
            _with(spec, 0, q_of(lambda a: torch.cat([a[0], a[0][:, :1]], 1))),
        ),
        BadInput("value length differs", "value", ValueError, _with(spec, 2, q_of(lambda a: a[2][:, :, :5]))),
        BadInput("key head size differs", "key", ValueError, _with(spec, 1, q_of(lambda a: a[1][..., :4]))),
        BadInput("empty query", "query", ValueError, _with(spec, 0, q_of(lambda a: a[0][:, :, :0]))),
        BadInput("key on another device", "key", ValueError, _with(spec, 1, q_of(lambda a: a[1].to("meta")))),
        BadInput("scale is NaN", "scale", ValueError, _with(spec, scale=float("nan"))),
        BadInput("scale is a string", "scale", TypeError, _with(spec, scale="0.1")),
        BadInput("dropout_p above 1", "dropout_p", ValueError, _with(spec, dropout_p=1.5)),
        BadInput("dropout_p negative", "dropout_p", ValueError, _with(spec, dropout_p=-0.1)),
        BadInput("is_causal not a bool", "is_causal", TypeError, _with(spec, is_causal="yes")),
        BadInput("return_lse not a bool", "return_lse", TypeError, _with(spec, return_lse=1)),
        BadInput(
            "kv_mask wrong shape", "kv_mask", ValueError, _with(spec, kv_mask=torch.ones(2, 15, dtype=torch.bool))
        ),
        BadInput("kv_mask not bool", "kv_mask", TypeError, _with(spec, kv_mask=torch.ones(2, 16))),
        BadInput(
            "attn_mask not broadcastable",
            "attn_mask",
            ValueError,
            _with(spec, attn_mask=torch.ones(3, 16, 16, dtype=torch.bool)),
        ),
        BadInput(
            "attn_mask integer", "attn_mask", TypeError, _with(spec, attn_mask=torch.ones(16, 16, dtype=torch.long))
        ),
        BadInput(
            "attn_mask float of another dtype",
            "attn_mask",
            TypeError,
            _with(spec, attn_mask=torch.zeros(16, 16, dtype=torch.float64)),
        ),
        BadInput("unknown method", "method", ValueError, _with(spec, method="no_such_method")),
        BadInput("unknown backend", "backend", ValueError, _with(spec, backend="no_such_backend")),
        BadInput("unknown parameter", "no_such_param", ValueError, _with(spec, no_such_param=1)),
    ]
    for f in dataclasses.fields(spec.params):
        table.append(
            BadInput(f"parameter {f.name} of a wrong type", f.name, TypeError, _with(spec, **{f.name: object()}))
        )
    table.extend(_capability_refusals(spec))
    return table


def _capability_refusals(spec: Method) -> list[BadInput]:
    caps, refusals = spec.capabilities, []
    if not caps.causal:
        refusals.append(BadInput("is_causal unsupported", "is_causal", ValueError, _with(spec, is_causal=True)))
    if not caps.noncausal:
        refusals.append(BadInput("non-causal unsupported", "is_causal", ValueError, _with(spec, is_causal=False)))
    if not caps.cross:
        refusals.append(
            BadInput(
                "cross attention unsupported", "key", ValueError, _with(spec, 1, lambda a: torch.cat([a[1], a[1]], 2))
            )
        )
    if not caps.gqa:
        refusals.append(BadInput("GQA unsupported", "key", ValueError, _with(spec, 1, lambda a: a[1][:, :1])))
    if not caps.kv_mask:
        refusals.append(
            BadInput(
                "kv_mask unsupported", "kv_mask", ValueError, _with(spec, kv_mask=torch.ones(2, 16, dtype=torch.bool))
            )
        )
    if not caps.attn_mask:
        refusals.append(
            BadInput(
                "attn_mask unsupported",
                "attn_mask",
                ValueError,
                _with(spec, attn_mask=torch.ones(16, 16, dtype=torch.bool)),
            )
        )
    if not caps.dropout:
        refusals.append(BadInput("dropout unsupported", "dropout_p", ValueError, _with(spec, dropout_p=0.1)))
    if not caps.lse:
        refusals.append(BadInput("return_lse unsupported", "return_lse", ValueError, _with(spec, return_lse=True)))
    if not caps.state:
        refusals.append(
            BadInput("return_state unsupported", "return_state", ValueError, _with(spec, return_state=True))
        )
    return refusals
