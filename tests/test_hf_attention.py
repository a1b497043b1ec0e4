"""attnzoo.integrations.transformers without model weights: registration, the compact mask
descriptor against transformers' own masks, and the attention function against transformers'
own attention functions on synthetic calls (GQA, padding, decode offsets, windows, softcap, sinks)."""

import logging
import types

import pytest
import torch

import attnzoo

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from attnzoo.integrations import transformers as hf  # noqa: E402
from attnzoo.integrations.hf_masks import MaskSpec, mask_descriptor, recognise  # noqa: E402


@pytest.fixture
def name(request):
    names = []

    def make(method="dense", **kwargs):
        label = f"attnzoo_test_{request.node.name}_{len(names)}".replace("[", "_").replace("]", "").replace("-", "_")
        names.append(hf.register(label, method, **kwargs))
        return names[-1]

    yield make
    for n in names:
        hf.unregister(n)


def _module(causal: bool, groups: int = 1):
    return types.SimpleNamespace(is_causal=causal, num_key_value_groups=groups, training=False, layer_idx=0)


def _qkv(b=2, hq=6, hkv=2, lq=11, lk=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, lq, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
    )


def _left_padding(b, total, pad=(3, 0)):
    mask = torch.ones(b, total, dtype=torch.bool)
    for row, n in enumerate(pad[:b]):
        mask[row, :n] = False
    return mask


@pytest.mark.parametrize(
    "bad,match",
    [("org/model", "'/' or ':'"), ("fn:x", "'/' or ':'"), ("", "non-empty"), ("sdpa", "already"), (3, "name")],
)
def test_register_refuses_bad_names(bad, match):
    with pytest.raises(ValueError, match=match):
        hf.register(bad, "dense")


def test_register_refuses_bad_methods_and_parameters():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        hf.register("attnzoo_bad", "nope")
    with pytest.raises(ValueError, match=r"unknown parameter.*'windw'"):
        hf.register("attnzoo_bad", "sliding_window", windw=3)
    with pytest.raises(ValueError, match="top_k"):
        hf.register("attnzoo_bad", "moba", top_k=0)
    with pytest.raises(ValueError, match="budget: method 'dense' has no budget"):
        hf.register("attnzoo_bad", "dense", budget=0.5)
    with pytest.raises(ValueError, match="budget must be a fraction"):
        hf.register("attnzoo_bad", "moba", budget=1.5)
    assert "attnzoo_bad" not in AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="not registered"):
        hf.fallbacks("attnzoo_bad")


def test_register_installs_both_functions(name):
    n = name("sliding_window", window=(8, 0))
    assert n in AttentionInterface._global_mapping
    assert AttentionMaskInterface._global_mapping[n] is mask_descriptor
    hf.unregister(n)
    assert n not in AttentionInterface._global_mapping and n not in AttentionMaskInterface._global_mapping
    hf.register(n, "dense")  # the fixture unregisters it again


@pytest.mark.parametrize(
    "function,expected",
    [
        (mu.causal_mask_function, (True, None)),
        (mu.bidirectional_mask_function, (False, None)),
        (mu.sliding_window_causal_mask_function(5), (True, 5)),
        (mu.sliding_window_bidirectional_mask_function(3), (False, 3)),
        (mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)), None),
        (mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function), None),
        (lambda b, h, q, k: k <= q, None),
    ],
)
def test_recognise(function, expected):
    assert recognise(function) == expected


@pytest.mark.parametrize(
    "function",
    [
        mu.causal_mask_function,
        mu.bidirectional_mask_function,
        mu.sliding_window_causal_mask_function(4),
        mu.sliding_window_bidirectional_mask_function(2),
        mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)),
    ],
)
@pytest.mark.parametrize("q_length,kv_length,q_offset", [(9, 9, 0), (1, 12, 11), (3, 12, 9)])
def test_descriptor_equals_transformers_mask(function, q_length, kv_length, q_offset):
    padding = _left_padding(2, kv_length)
    args = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=0)
    expected = mu.sdpa_mask(**args, mask_function=function, attention_mask=padding, allow_is_causal_skip=False)
    spec = mask_descriptor(**args, mask_function=function, attention_mask=padding)
    assert isinstance(spec, MaskSpec)
    assert (spec.dense is None) == (recognise(function) is not None)
    assert torch.equal(spec.to_bool(2, torch.device("cpu")), expected.expand(2, 1, q_length, kv_length))


def _sdpa(module, q, k, v, function, padding, q_offset=0, **kwargs):
    mask = mu.sdpa_mask(
        batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2], q_offset=q_offset,
        mask_function=function, attention_mask=padding, allow_is_causal_skip=False,
    )  # fmt: skip
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


def _ours(n, module, q, k, v, function, padding, q_offset=0, **kwargs):
    spec = mask_descriptor(q.shape[0], q.shape[2], k.shape[2], q_offset, 0, function, padding)
    return AttentionInterface._global_mapping[n](module, q, k, v, spec, **kwargs)[0]


@pytest.mark.parametrize(
    "causal,lq,function",
    [
        (True, 11, mu.causal_mask_function),
        (True, 1, mu.causal_mask_function),
        (True, 3, mu.causal_mask_function),
        (False, 11, mu.bidirectional_mask_function),
    ],
)
def test_dense_equals_transformers_sdpa(name, causal, lq, function):
    n = name("dense")
    q, k, v = _qkv(lq=lq, lk=11)
    module, padding = _module(causal, groups=3), _left_padding(2, 11)
    offset = 11 - lq
    expected = _sdpa(module, q, k, v, function, padding, offset, scaling=0.3)
    got = _ours(n, module, q, k, v, function, padding, offset, scaling=0.3)
    real = padding[:, offset:]  # query rows of padding tokens see no key: SDPA and attnzoo differ there
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-6)
    assert hf.fallbacks(n) == {}


@pytest.mark.parametrize("lq", [11, 2])
def test_sliding_window_kwarg(name, lq):
    """A model's sliding layer (Gemma, Mistral): the mask function and the keyword both carry the
    window; ``dense`` serves it with attnzoo's exact sliding window."""
    n = name("dense")
    q, k, v = _qkv(lq=lq, lk=11)
    function, padding = mu.sliding_window_causal_mask_function(4), _left_padding(2, 11, (2, 0))
    expected = _sdpa(_module(True, 3), q, k, v, function, padding, 11 - lq)
    got = _ours(n, _module(True, 3), q, k, v, function, padding, 11 - lq, sliding_window=4)
    real = padding[:, 11 - lq :]
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-6)
    assert hf.fallbacks(n) == {}


@pytest.mark.parametrize("method,params,keys", [("dense", {}, 300), ("sliding_window", {"window": (40, 0)}, 41)])
def test_model_window_beyond_the_method_default(name, method, params, keys):
    """A model window wider than sliding_window's default (256) is the model's, not the default;
    a sliding_window registration keeps the narrower of its own and the model's."""
    n = name(method, **params)
    q, k, v = _qkv(b=1, lq=520, lk=520, d=8)
    expected_fn = mu.sliding_window_causal_mask_function(keys)
    expected = _sdpa(_module(True, 3), q, k, v, expected_fn, None)
    model_fn = mu.sliding_window_causal_mask_function(300)
    got = _ours(n, _module(True, 3), q, k, v, model_fn, None, sliding_window=300)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_softcap_and_sinks_fall_back_to_transformers_eager(name, caplog):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    n = name("sliding_window", window=(64, 0))
    q, k, v = _qkv()
    padding = _left_padding(2, 11)
    module = _module(True, 3)
    float_mask = mu.eager_mask(2, 11, 11, mask_function=mu.causal_mask_function, attention_mask=padding)
    real = padding
    with caplog.at_level(logging.WARNING, logger=hf.__name__):
        got = _ours(n, module, q, k, v, mu.causal_mask_function, padding, scaling=0.25, softcap=2.0)
        _ours(n, module, q, k, v, mu.causal_mask_function, padding, scaling=0.25, softcap=2.0)
    expected = gemma2_eager(module, q, k, v, float_mask, scaling=0.25, softcap=2.0)[0]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert hf.fallbacks(n) == {"softcap": 2}
    assert sum("softcap" in r.getMessage() for r in caplog.records) == 1  # logged once

    module.sinks = torch.randn(6)
    got = _ours(n, module, q, k, v, mu.causal_mask_function, padding, scaling=0.25, s_aux=module.sinks)
    expected = gpt_oss_eager(module, q, k, v, float_mask, scaling=0.25)[0]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert hf.fallbacks(n)["attention sinks (s_aux)"] == 1


def test_strict_refuses_instead_of_falling_back(name):
    n = name("moba", block_size=4, top_k=2, strict=True)
    q, k, v = _qkv()
    with pytest.raises(hf.FallbackRefused, match="softcap"):
        _ours(n, _module(True, 3), q, k, v, mu.causal_mask_function, None, softcap=3.0)


def test_unrecognised_pattern_uses_transformers_mask(name):
    n = name("moba", block_size=4, top_k=2)
    q, k, v = _qkv()
    function = mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    padding = _left_padding(2, 11, (0, 0))
    expected = _sdpa(_module(True, 3), q, k, v, function, padding)
    torch.testing.assert_close(_ours(n, _module(True, 3), q, k, v, function, padding), expected)
    (reason,) = hf.fallbacks(n)
    assert "does not recognise" in reason


def test_layout_errors_name_the_argument(name):
    n = name("dense")
    fn = AttentionInterface._global_mapping[n]
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query: expected a 4-D"):
        fn(_module(True), q[0], k, v, None)
    with pytest.raises(ValueError, match="key: 2 key/value heads do not divide 5"):
        fn(_module(True), q[:, :5], k, v, None)
    with pytest.raises(ValueError, match="attention_mask: describes"):
        fn(_module(True), q, k, v, mask_descriptor(2, 5, 11, 6, 0, mu.causal_mask_function))
    with pytest.raises(TypeError, match="attention_mask"):
        fn(_module(True), q, k, v, "causal")


CAUSAL = [m.name for m in attnzoo.methods() if m.capabilities.causal and m.name not in ("aaren",)]


@pytest.mark.parametrize("method", CAUSAL)
def test_decode_rows_equal_the_full_call(name, method):
    """Queries as the last positions of a KV cache: methods with cross attention or independent
    rows give exactly the full call's last rows; the others fall back, counted."""
    spec = attnzoo.get_method(method)
    n = name(method, budget=0.25) if spec.budget else name(method)
    q, k, v = _qkv(b=1, lq=64, lk=64, seed=3)
    q64, k64, v64 = q.double(), k.double(), v.double()
    fn = AttentionInterface._global_mapping[n]
    full = fn(_module(True, 3), q64, k64, v64, None)[0]
    last = fn(_module(True, 3), q64[:, :, -2:], k64, v64, None)[0]
    if spec.capabilities.cross or spec.rows_independent:
        if spec.query_block is None:
            torch.testing.assert_close(last, full[:, -2:], atol=1e-12, rtol=0)
        assert hf.fallbacks(n) == {}
    else:
        assert list(hf.fallbacks(n)) == [f"decoding with a KV cache ({method} needs the earlier queries, not kept)"]


def test_a_method_that_cannot_take_model_queries_fails_clearly(name):
    n = name("aaren")  # aaren reads one query token per head; a model's queries vary along the sequence
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query"):
        AttentionInterface._global_mapping[n](_module(True, 3), q, k, v, None)
