"""Dispatch overhead of ``attnzoo.attention`` over ``torch.nn.functional.scaled_dot_product_attention``.

What: per-call time of ``attnzoo.attention(q, k, v)`` (validation + backend selection, then SDPA)
against a direct ``F.scaled_dot_product_attention(q, k, v)`` call on CPU, float32, inference.
Target: overhead under 5% at B=1, H=8, N=1024, D=64.

How: ``torch.set_num_threads`` pinned, ``torch.no_grad()``, a warm-up, then the two variants
are interleaved round-robin in one process (order reversed every other round) and every
per-call time is recorded. Reported: median and min of each, the ratio of medians and of mins,
overhead % = (ratio - 1) * 100, plus the median of per-round ratios (robust to the machine's
speed drifting) and an A/A control (SDPA against itself, the noise floor), for a dense and a
causal (``is_causal=True``) row. A tiny
shape (B=1, H=1, N=1, D=8; each sample the mean of ``--tiny-inner`` calls) measures the
absolute Python cost of dispatch in microseconds.

Run (from the repository root):
    .venv/bin/python benchmarks/dispatch_overhead.py [--threads 2] [--rounds 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Stats, fmt_time, header, interleaved, md_header, md_row, pin_threads

import attnzoo

TARGET_PCT = 5.0


def make_inputs(b: int, h: int, n: int, d: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=gen) for _ in range(3))


def run_case(name: str, shape: tuple[int, ...], causal: bool, args, inner: int, target: bool) -> dict:
    q, k, v = make_inputs(*shape)
    chosen = attnzoo.explain(q, k, v, is_causal=causal).chosen
    sdpa_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    same = torch.equal(attnzoo.attention(q, k, v, is_causal=causal), sdpa_out)
    stats: dict[str, Stats] = interleaved(
        {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "attnzoo": lambda: attnzoo.attention(q, k, v, is_causal=causal),
            "sdpa_again": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),  # A/A control
        },
        rounds=args.rounds,
        warmup=args.warmup,
        inner=inner,
    )
    sdpa, zoo = stats["sdpa"], stats["attnzoo"]
    ratio_med, ratio_min = zoo.median / sdpa.median, zoo.min / sdpa.min
    paired = statistics.median(z / s for z, s in zip(zoo.times, sdpa.times, strict=True))
    pct = (ratio_med - 1) * 100
    return {
        "case": name,
        "shape": "B={},H={},N={},D={}".format(*shape),
        "is_causal": causal,
        "backend": chosen,
        "bitwise_equal": same,
        "inner_calls_per_sample": inner,
        "sdpa_median_s": sdpa.median,
        "sdpa_min_s": sdpa.min,
        "attnzoo_median_s": zoo.median,
        "attnzoo_min_s": zoo.min,
        "delta_median_us": (zoo.median - sdpa.median) * 1e6,
        "ratio_median": ratio_med,
        "overhead_pct_median": pct,
        "ratio_min": ratio_min,
        "overhead_pct_min": (ratio_min - 1) * 100,
        "paired_ratio_median": paired,
        "aa_noise_pct": (stats["sdpa_again"].median / sdpa.median - 1) * 100,
        "target": (("PASS" if pct < TARGET_PCT else "FAIL") + f" (<{TARGET_PCT:g}%)") if target else "n/a",
        "sdpa_times_s": sdpa.times,
        "attnzoo_times_s": zoo.times,
    }


def print_table(rows: list[dict]) -> None:
    cols = [
        "case",
        "shape",
        "backend",
        "SDPA median",
        "attnzoo median",
        "SDPA min",
        "attnzoo min",
        "Δ median",
        "ratio (medians)",
        "overhead % (medians)",
        "ratio (mins)",
        "overhead % (mins)",
        "median of per-round ratios",
        "A/A noise",
        "target",
    ]
    md_header(cols)
    for r in rows:
        cells = [
            r["case"],
            r["shape"],
            r["backend"] + ("" if r["bitwise_equal"] else " (NOT bitwise equal)"),
            fmt_time(r["sdpa_median_s"]),
            fmt_time(r["attnzoo_median_s"]),
            fmt_time(r["sdpa_min_s"]),
            fmt_time(r["attnzoo_min_s"]),
            f"{r['delta_median_us']:+.1f} µs",
            f"{r['ratio_median']:.4f}",
            f"{r['overhead_pct_median']:+.2f}%",
            f"{r['ratio_min']:.4f}",
            f"{r['overhead_pct_min']:+.2f}%",
            f"{r['paired_ratio_median']:.4f} ({(r['paired_ratio_median'] - 1) * 100:+.2f}%)",
            f"{r['aa_noise_pct']:+.2f}%",
            r["target"],
        ]
        md_row(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per variant (default 10)")
    parser.add_argument("--n", type=int, default=1024, help="sequence length of the main rows (default 1024)")
    parser.add_argument("--tiny-inner", type=int, default=200, help="calls per tiny sample (default 200)")
    parser.add_argument("--json", type=Path, help="also write all numbers (and raw per-call times) here")
    args = parser.parse_args()

    pin_threads(args.threads)
    settings = (
        f"float32, CPU, torch.no_grad(), {args.rounds} interleaved rounds (order alternating), "
        f"{args.warmup} warm-up calls per variant; tiny row: each sample = mean of {args.tiny_inner} calls"
    )
    print(f"# attnzoo.attention vs F.scaled_dot_product_attention\n\n{header()}\n\nSettings: {settings}\n")
    main_shape = (1, 8, args.n, 64)
    with torch.no_grad():
        rows = [
            run_case("dense", main_shape, False, args, inner=1, target=True),
            run_case("causal", main_shape, True, args, inner=1, target=True),
            run_case("tiny (pure Python dispatch)", (1, 1, 1, 8), False, args, args.tiny_inner, target=False),
        ]
    print_table(rows)
    *big, tiny = rows
    print(
        f"\nAbsolute dispatch cost per call (tiny shape, medians): {tiny['delta_median_us']:.1f} µs "
        f"(attnzoo {fmt_time(tiny['attnzoo_median_s'])} vs SDPA {fmt_time(tiny['sdpa_median_s'])}).\n"
        f"Overhead % = (ratio - 1) * 100; the target (< {TARGET_PCT:g}%) is judged on the ratio of medians.\n"
        "Median of per-round ratios: each round's attnzoo time over the same round's SDPA time (robust to\n"
        "machine speed drifting during the run; compare it with the ratio of medians on a noisy machine).\n"
        "A/A noise: SDPA timed a second time in the same rounds, its median over the first's: the\n"
        "measurement's noise floor. Expected overhead from the tiny row's Δ alone: "
        + ", ".join(f"{r['case']} {tiny['delta_median_us'] / 1e4 / r['sdpa_median_s']:.2f}%" for r in big)
        + "."
    )
    if args.json:
        args.json.write_text(json.dumps({"header": header(), "settings": settings, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
