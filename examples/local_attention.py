"""Train with local attention on the CPU: a sliding-window language-model layer and a 2-D
neighbourhood-attention layer, a few optimiser steps each (forward and backward run through
attnzoo's tile kernel; no compile step).

Run: .venv/bin/python examples/local_attention.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo as az


class LocalBlock(nn.Module):
    """Pre-norm attention block over [B, *positions, C] with any attnzoo method."""

    def __init__(self, dim: int, heads: int, **attention_kwargs) -> None:
        super().__init__()
        self.heads, self.kwargs = heads, attention_kwargs
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        # [B, *positions, H * D] -> [B, H, *positions, D], attnzoo's layout
        split = lambda t: t.unflatten(-1, (self.heads, -1)).movedim(-2, 1)  # noqa: E731
        o = az.attention(split(q), split(k), split(v), **self.kwargs)
        return x + self.out(o.movedim(1, -2).flatten(-2))


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int = 30) -> tuple[float, float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def main() -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    results = {}
    # a causal sliding window of 32 keys with 2 attention sinks, over 512 tokens
    tokens = torch.randn(4, 512, 64)
    swa = LocalBlock(64, heads=4, is_causal=True, method="sliding_window", window=(31, 0), sinks=2)
    results["sliding_window"] = train(swa, tokens, tokens.roll(1, dims=1))
    # a 7x7 neighbourhood over a 24x24 feature map
    image = torch.randn(2, 24, 24, 32)
    nat = LocalBlock(32, heads=4, method="neighborhood", kernel_size=7)
    results["neighborhood"] = train(nat, image, image.flip(1))
    for name, (first, last) in results.items():
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
    return results


if __name__ == "__main__":
    main()
