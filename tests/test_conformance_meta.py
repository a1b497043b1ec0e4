"""The conformance suite catches broken methods: each check below must fail on a planted bug."""

import dataclasses

import pytest
import torch

import attnzoo
from attnzoo.methods.dense import DENSE
from attnzoo.params import MethodParams, param
from attnzoo.registry import AttentionOutput, Backend, registered
from attnzoo.testing import (
    check_case,
    check_causality,
    check_decode,
    check_degenerate,
    check_dropout,
    check_gradcheck,
    check_prefix,
    conformance_cases,
    property_checks,
)
from attnzoo.testing.bad_inputs import bad_inputs


def _variant(name, run):
    return dataclasses.replace(DENSE, name=name, backends=(Backend("buggy", run),))


def _sdpa(call, **changes):
    call = call.replace(**changes)
    return attnzoo.get_method("dense").backend("sdpa").run(call, None)


def leaks_future(call, params):
    return _sdpa(call, is_causal=False, return_lse=call.return_lse)


def wrong_scale(call, params):
    return _sdpa(call, scale=call.scale * 1.01)


def partly_uninitialised(call, params):
    result = _sdpa(call)
    out = result.out.new_empty(result.out.shape)
    out[..., : max(1, call.q_len // 2), :] = result.out[..., : max(1, call.q_len // 2), :]
    return AttentionOutput(out, result.lse)


class _NoKeyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k):
        return k.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def drops_key_gradient(call, params):
    return _sdpa(call, key=_NoKeyGrad.apply(call.key))


def _gold_failures(name):
    cases = [c for c in conformance_cases([name], quick=True) if c.dtype == torch.float32]
    return [c.pattern.name for c in cases if not check_case(c).passed]


def test_future_leak_is_caught():
    with registered(_variant("leaky", leaks_future)) as spec:
        assert not check_causality(spec, "buggy", {}).passed
        assert not check_prefix(spec, "buggy", {}).passed
        assert "causal" in _gold_failures(spec.name)


def test_small_numerical_error_is_caught():
    with registered(_variant("off_by_one_percent", wrong_scale)) as spec:
        failures = _gold_failures(spec.name)
        assert "full" in failures and "causal" in failures


def test_unwritten_memory_is_caught_by_poisoning():
    with registered(_variant("uninitialised", partly_uninitialised)) as spec:
        assert {"causal", "cross"} <= set(_gold_failures(spec.name))


def test_wrong_gradient_is_caught():
    with registered(_variant("no_key_grad", drops_key_gradient)) as spec:
        assert not check_gradcheck(spec, "buggy", {}).passed
        case = next(c for c in conformance_cases([spec.name], quick=True) if c.pattern.name == "full")
        result = check_case(case)
        assert not result.passed and "grad_k" in result.message


def test_decoder_that_forgets_its_cache_is_caught():
    from attnzoo.methods.dense import _step, init_kv_cache
    from attnzoo.registry import Decoder

    def forgetful_step(call, cache, params):
        return _step(
            call,
            init_kv_cache(call.batch, call.kv_heads, call.head_dim, call.value_dim, call.dtype, call.device, params),
            params,
        )

    forgetful = dataclasses.replace(DENSE, name="forgetful", decoder=Decoder(init_kv_cache, forgetful_step))
    with registered(forgetful) as spec:
        assert not check_decode(spec, {}).passed


def test_unscaled_dropout_is_caught():
    def unscaled_dropout(call, params):
        result = _sdpa(call, dropout_p=0.0)
        keep = torch.rand(call.q_len, call.kv_len) >= call.dropout_p  # drops weights without 1/(1-p)
        masked = _sdpa(call, dropout_p=0.0, attn_mask=keep) if call.dropout_p else result
        return AttentionOutput(masked.out * (1 - call.dropout_p) if call.dropout_p else result.out)

    with registered(_variant("unscaled_dropout", unscaled_dropout)) as spec:
        result = check_dropout(spec, "buggy", {})
        assert result is not None and not result.passed


def test_a_crashing_backend_is_a_failure_reported_under_its_method(capsys):
    from attnzoo import cli
    from attnzoo.testing import run_checks

    def crashes(call, params):
        raise RuntimeError("kernel exploded")

    with registered(_variant("crashy", crashes)) as spec:
        errors = [r for r in run_checks([spec.name]) if r.check == "error"]
        assert errors and all(r.case_id == "crashy-crash" and "kernel exploded" in r.message for r in errors)
        assert cli.main(["check", spec.name]) == 1
        assert "crashy" in capsys.readouterr().out


def test_a_registered_method_is_picked_up_everywhere():
    with registered(_variant("another_dense", DENSE.backends[0].run)) as spec:
        assert spec in attnzoo.methods()
        assert conformance_cases([spec.name])
        assert len(bad_inputs(spec)) >= 20
    assert spec not in attnzoo.methods()


def test_capability_refusals_come_from_the_registry():
    narrow = dataclasses.replace(
        DENSE, name="narrow", capabilities=attnzoo.Capabilities(causal=True, noncausal=False), decoder=None
    )
    with registered(narrow) as spec:
        q = torch.randn(1, 2, 8, 4)
        for kwargs, argument in [
            ({"is_causal": False}, "is_causal"),
            ({"is_causal": True, "kv_mask": torch.ones(1, 8, dtype=torch.bool)}, "kv_mask"),
            ({"is_causal": True, "return_lse": True}, "return_lse"),
        ]:
            with pytest.raises(ValueError, match=argument):
                attnzoo.attention(q, q, q, method=spec.name, **kwargs)
        with pytest.raises(ValueError, match="key"):
            attnzoo.attention(q, q[:, :1], q[:, :1], is_causal=True, method=spec.name)


@dataclasses.dataclass(frozen=True)
class FirstKeysParams(MethodParams):
    num_keys: int = param(4, "keys kept, from the start")


def _first_keys(call, params):
    kept = torch.zeros(call.batch, call.kv_len, dtype=torch.bool)
    kept[:, : params.num_keys] = True
    return attnzoo.get_method("dense").backend("sdpa").run(call.replace(kv_mask=kept), None)


def _first_keys_method(degenerate):
    return dataclasses.replace(
        DENSE,
        name="first_keys",
        exact=False,
        family="content_sparse",
        params=FirstKeysParams,
        reference=_first_keys,
        backends=(Backend("masked", _first_keys),),
        decoder=None,
        capabilities=attnzoo.Capabilities(causal=False, noncausal=True),
        degenerate_params=degenerate,
    )


def test_degenerate_limit_hook():
    with registered(_first_keys_method(lambda call: {"num_keys": call.kv_len})) as spec:
        assert check_degenerate(spec, "masked").passed
    with registered(_first_keys_method(lambda call: {"num_keys": call.kv_len - 1})) as spec:
        assert not check_degenerate(spec, "masked").passed


def _grid_reference(call, params):
    """Dense attention over the flattened grid (the spec of the toy spatial method)."""
    from attnzoo.kernels.masks import dense_visibility
    from attnzoo.kernels.reference import softmax_reference

    out, lse = softmax_reference(call, dense_visibility(call))
    return AttentionOutput(out, lse if call.return_lse else None)


def _grid_flat_sdpa(call, params, transpose_queries=False):
    query = call.query
    if transpose_queries and query.dim() > 4:  # a layout bug: rows come back in the wrong places
        query = query.transpose(2, 3)
    flat = call.replace(
        query=query.flatten(2, -2), key=call.key.flatten(2, -2), value=call.value.flatten(2, -2), spatial_shape=None
    )
    result = attnzoo.get_method("dense").backend("sdpa").run(flat, None)
    layout = call.query.shape[:-1]
    lse = None if result.lse is None else result.lse.reshape(layout)
    return AttentionOutput(result.out.reshape(*layout, call.value_dim), lse)


def _grid_method(name, run):
    return dataclasses.replace(
        DENSE,
        name=name,
        family="local",
        capabilities=attnzoo.Capabilities(causal=False, gqa=True, kv_mask=True, lse=True, spatial_dims=(1, 2, 3)),
        reference=_grid_reference,
        backends=(Backend("flat_sdpa", run),),
        decoder=None,
    )


def test_spatial_methods_get_generated_cases_in_every_layout():
    with registered(_grid_method("grid_dense", _grid_flat_sdpa)) as spec:
        cases = conformance_cases([spec.name], quick=False)
        ranks = {len(c.shape.spatial) for c in cases}
        assert ranks == {1, 2, 3} and not any("cross" in c.pattern.name for c in cases)
        quick = conformance_cases([spec.name], quick=True)
        failures = [c.id for c in quick if not check_case(c).passed]
        assert not failures, failures
        for check in property_checks(spec):
            result = check()
            assert result is None or result.passed, result.message
        q = torch.randn(1, 2, 4, 5, 8)
        assert attnzoo.attention(q, q, q, method=spec.name).shape == q.shape


def test_spatial_layout_bug_is_caught():
    buggy = _grid_method("grid_transposed", lambda call, params: _grid_flat_sdpa(call, params, transpose_queries=True))
    with registered(buggy) as spec:
        cases = [c for c in conformance_cases([spec.name], quick=True) if len(c.shape.spatial) >= 2]
        assert cases and not any(check_case(c).passed for c in cases)
