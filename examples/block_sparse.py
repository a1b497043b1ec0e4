"""Block-sparse attention on the CPU: a FlexAttention ``mask_mod``, a fixed pattern (BigBird) and a
content-selected one (MoBA) each train a small causal layer for a few optimiser steps (forward and
backward through attnzoo's block-sparse kernel), and MoBA reports the density it used.

Run: .venv/bin/python examples/block_sparse.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo as az


def documents(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Packed documents of 96 tokens: a query sees only its own document (FlexAttention's signature)."""
    return (q_idx // 96) == (kv_idx // 96)


def train(model: nn.Module, tokens: torch.Tensor, steps: int = 25) -> tuple[float, float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(tokens, is_causal=True), tokens.roll(1, dims=1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def main() -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    tokens = torch.randn(2, 768, 64)
    mha = az.nn.MultiheadAttention
    layers = {
        "block_sparse (mask_mod)": mha(64, 4, method="block_sparse", mask_mod=documents, block_size=32),
        "bigbird": mha(64, 4, method="bigbird", block_size=32),
        "moba": mha(64, 4, method="moba", block_size=64, top_k=3),
    }
    results = {name: train(layer, tokens) for name, layer in layers.items()}
    with az.collect_stats() as stats, torch.no_grad():
        layers["moba"](tokens, is_causal=True)
    for name, (first, last) in results.items():
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
    print(f"moba computed {stats[0]['density']:.1%} of the score matrix (visited blocks)")
    return results


if __name__ == "__main__":
    main()
