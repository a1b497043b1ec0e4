"""Block-sparse attention on the CPU: a FlexAttention ``mask_mod``, a fixed pattern (BigBird) and a
content-selected one (MoBA) each train a small causal layer for a few optimiser steps (forward and
backward through attnzoo's block-sparse kernel), and MoBA reports the density it used.

Run: .venv/bin/python examples/block_sparse.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo as az


class Block(nn.Module):
    """Pre-norm attention block over [B, N, C] with any attnzoo method."""

    def __init__(self, dim: int, heads: int, **attention_kwargs) -> None:
        super().__init__()
        self.heads, self.kwargs = heads, attention_kwargs
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, -1))
        o = az.attention(q, k, v, **self.kwargs)  # [B, H, N, D]
        return x + self.out(o.transpose(1, 2).flatten(-2))


def documents(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Packed documents of 96 tokens: a query sees only its own document (FlexAttention's signature)."""
    return (q_idx // 96) == (kv_idx // 96)


def train(model: nn.Module, tokens: torch.Tensor, steps: int = 25) -> tuple[float, float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(tokens), tokens.roll(1, dims=1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def main() -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    tokens = torch.randn(2, 768, 64)
    layers = {
        "block_sparse (mask_mod)": Block(
            64, 4, is_causal=True, method="block_sparse", mask_mod=documents, block_size=32
        ),
        "bigbird": Block(64, 4, is_causal=True, method="bigbird", block_size=32),
        "moba": Block(64, 4, is_causal=True, method="moba", block_size=64, top_k=3),
    }
    results = {name: train(layer, tokens) for name, layer in layers.items()}
    with az.collect_stats() as stats, torch.no_grad():
        layers["moba"](tokens)
    for name, (first, last) in results.items():
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
    print(f"moba computed {stats[0]['density']:.1%} of the score matrix (visited blocks)")
    return results


if __name__ == "__main__":
    main()
