"""Linear and gated-recurrent attention on the CPU: a few methods each train a small causal layer
(forward and backward through the chunkwise form), then one of them generates token by token from
a constant-size state, matching the full-sequence output.

Run: .venv/bin/python examples/linear_attention.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo as az


def train(model: nn.Module, tokens: torch.Tensor, steps: int = 25) -> tuple[float, float]:
    """Regress a causal task these methods can express: the running mean of the tokens so far."""
    target = tokens.cumsum(dim=1) / torch.arange(1, tokens.shape[1] + 1)[:, None]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(tokens, is_causal=True), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def decode_demo() -> None:
    """Prefill 500 tokens with ``return_state=True``, then decode 20 more one at a time."""
    q, k, v = (torch.randn(1, 4, 520, 32) for _ in range(3))
    full = az.attention(q, k, v, is_causal=True, method="retention")
    _, prefill = az.attention(
        q[:, :, :500], k[:, :, :500], v[:, :, :500], is_causal=True, method="retention", return_state=True
    )
    state = az.init_state("retention", batch=1, kv_heads=4, head_dim=32, initial_state=prefill)
    outs = []
    for t in range(500, 520):
        out, state = az.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    err = (torch.cat(outs, dim=2) - full[:, :, 500:]).abs().max().item()
    print(
        f"retention: decoded 20 tokens after a 500-token prefill; state {state.size_bytes()} bytes; "
        f"max difference from the full sequence {err:.1e}"
    )


def main() -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    tokens = torch.randn(2, 512, 64)
    mha = az.nn.MultiheadAttention
    layers = {
        "linear (elu+1)": mha(64, 4, method="linear"),
        "retention": mha(64, 4, method="retention"),
        "performer": mha(64, 4, method="performer", num_features=64),
    }
    results = {name: train(layer, tokens) for name, layer in layers.items()}
    for name, (first, last) in results.items():
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
    decode_demo()
    return results


if __name__ == "__main__":
    main()
