"""A small tour of attnzoo: the SDPA drop-in, padding, the log-sum-exp merge and explain()."""

import torch
import torch.nn.functional as F

import attnzoo as az


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 512, 64) for _ in range(3))

    out = az.attention(q, k, v, is_causal=True)
    same = torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"dense attention equals SDPA bitwise: {same}")

    out_tiled, _ = az.attention(q, k, v, is_causal=True, backend="tiled", return_lse=True)
    print(f"tiled backend vs SDPA, max abs difference: {(out_tiled - out).abs().max().item():.2e}")

    halves = [az.attention(q, k[:, :, s], v[:, :, s], return_lse=True) for s in (slice(0, 200), slice(200, None))]
    merged, _ = az.merge_attention_states([h[0] for h in halves], [h[1] for h in halves])
    full = az.attention(q, k, v)
    print(f"merging two key halves by their LSE, max abs difference: {(merged - full).abs().max().item():.2e}")

    kv_mask = torch.ones(2, 512, dtype=torch.bool)
    kv_mask[1, :128] = False  # the second sequence is left-padded by 128 tokens
    padded = az.attention(q, k, v, kv_mask=kv_mask, is_causal=True)
    print(f"left padding, output finite: {bool(torch.isfinite(padded).all())}")

    print(az.explain(q, k, v, kv_mask=kv_mask, is_causal=True, return_lse=True))
    print(az.explain(q, k, v[..., :32], return_lse=True))


if __name__ == "__main__":
    main()
