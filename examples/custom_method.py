"""Adding a method to attnzoo, end to end (the worked example of docs/adding_a_method.md).

``first_keys``: every query attends to the first ``num_keys`` keys only (a toy "attention sinks
only" pattern). Approximate; with ``num_keys >= Nk`` it is exact attention. The module below is all
a method needs; the conformance suite, ``attnzoo check``, the docs table and the hypothesis test
pick it up from the registration with no new test code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attnzoo
from attnzoo.inputs import AttentionCall
from attnzoo.kernels.masks import dense_visibility
from attnzoo.kernels.reference import softmax_reference
from attnzoo.params import MethodParams, param
from attnzoo.registry import AttentionOutput, Backend, Capabilities, Method, Paper, registered
from attnzoo.testing import run_checks


@dataclass(frozen=True)
class FirstKeysParams(MethodParams):
    num_keys: int = param(16, "keys every query may see, counted from the first")

    def validate(self) -> None:
        if self.num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {self.num_keys}")


def _visible(call: AttentionCall, params: FirstKeysParams) -> torch.Tensor:
    kept = torch.arange(call.kv_len, device=call.device) < params.num_keys  # (Nk,)
    padding = dense_visibility(call)  # kv_mask, if any
    return kept if padding is None else padding & kept


def reference(call: AttentionCall, params: FirstKeysParams) -> AttentionOutput:
    """softmax(q k^T * scale) @ v over keys ``j < num_keys``, every score materialised."""
    out, lse = softmax_reference(call, _visible(call, params))
    return AttentionOutput(out, lse if call.return_lse else None)


def _sliced_call(call: AttentionCall, params: FirstKeysParams) -> AttentionCall:
    """The same call on the first ``num_keys`` keys only: exact for this method, and cheaper."""
    m = min(params.num_keys, call.kv_len)
    kv_mask = None if call.kv_mask is None else call.kv_mask[:, :m]
    return call.replace(key=call.key[:, :, :m], value=call.value[:, :, :m], kv_len=m, kv_mask=kv_mask)


_SDPA = attnzoo.get_method("dense").backend("sdpa")


def _run_sliced(call: AttentionCall, params: FirstKeysParams) -> AttentionOutput:
    return _SDPA.run(_sliced_call(call, params), None)


def _sliced_reasons(call: AttentionCall, params: FirstKeysParams) -> list[str]:
    return _SDPA.why_not(_sliced_call(call, params), None)  # it can run wherever SDPA can


FIRST_KEYS = Method(
    name="first_keys",
    family="content_sparse",
    exact=False,
    summary="Every query attends to the first `num_keys` keys only (a worked example, not a real method).",
    paper=Paper("attnzoo: adding a method", "https://arxiv.org/abs/2205.14135"),
    capabilities=Capabilities(causal=False, noncausal=True, gqa=True, kv_mask=True, lse=True),
    params=FirstKeysParams,
    reference=reference,
    backends=(Backend("sliced", _run_sliced, _sliced_reasons, description="SDPA over the first keys"),),
    test_params=({"num_keys": 1}, {"num_keys": 40}),
    degenerate_params=lambda call: {"num_keys": call.kv_len},
)


def main() -> int:
    # In the library the module calls attnzoo.register(...) once and methods/__init__.py imports it;
    # here it is registered only for the duration of the checks.
    with registered(FIRST_KEYS):
        q, k, v = (torch.randn(1, 4, 100, 32) for _ in range(3))
        out = attnzoo.attention(q, k, v, method="first_keys", num_keys=10)
        print(f"first_keys output {list(out.shape)}; {attnzoo.explain(q, k, v, method='first_keys')}")
        results = run_checks(["first_keys"])
        failed = [r for r in results if not r.passed]
        for r in failed:
            print(f"FAIL {r.check} {r.case_id}: {r.message}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
