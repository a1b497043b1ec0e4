"""Extra peak memory of one attention call: attnzoo's ``tiled`` backend vs SDPA and the dense reference.

What: the process's peak RSS rise during one call at B=1, H=8, D=64, float32, CPU. Target: the
``tiled`` forward at N=8192 adds less than 10% of one N x N float32 matrix (256 MiB at N=8192),
judged on the headline number, which INCLUDES the output tensor the call returns (16 MiB here).

How (Linux only, /proc): every measurement runs in a fresh subprocess of this script
(``--variant``), so no variant's allocator cache hides another's peak. In it: inputs built, one
warm-up call, its results dropped, ``gc.collect()`` and glibc ``malloc_trim(0)``; VmRSS read;
"5" written to /proc/self/clear_refs (resets VmHWM to VmRSS); one call; VmHWM read. Extra peak
= VmHWM - VmRSS_before. Reported both as is and with the returned tensors subtracted (the
output; for forward+backward also the three input gradients). Each cell is the median of
``--reps`` subprocesses (``--mmap-threshold 131072`` shows the live-tensor peak without glibc's
heap retention, as a diagnostic). Forward rows run under ``torch.no_grad()``; ``tiled fwd+bwd`` has
inputs with ``requires_grad`` and runs ``out.backward(grad)`` with a preallocated ``grad``.

Run (from the repository root; a few minutes):
    .venv/bin/python benchmarks/tiled_memory.py [--sizes 4096,8192] [--threads 2] [--reference-n 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import (
    MiB,
    child_runs,
    header,
    md_header,
    md_row,
    pin_threads,
    release_free_memory,
    reset_peak,
    status_bytes,
)

import attnzoo

B, H, D = 1, 8, 64
TARGET_PCT = 10.0
VARIANTS = {
    "tiled": "attnzoo backend='tiled', forward",
    "tiled-causal": "attnzoo backend='tiled', is_causal, forward",
    "tiled-fwdbwd": "attnzoo backend='tiled', forward+backward",
    "sdpa": "F.scaled_dot_product_attention, forward",
    "sdpa-causal": "F.scaled_dot_product_attention, is_causal, forward",
    "reference": "attnzoo backend='reference' (N x N materialised), forward",
}


def make_call(variant: str, n: int):
    """Inputs for ``variant`` and a closure running one call, returning the tensors it hands back."""
    grad = variant == "tiled-fwdbwd"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(grad) for _ in range(3))
    dout = torch.randn(B, H, n, D, generator=gen) if grad else None
    causal = variant.endswith("causal")

    def call() -> list[torch.Tensor]:
        if variant.startswith("sdpa"):
            return [F.scaled_dot_product_attention(q, k, v, is_causal=causal)]
        backend = "reference" if variant == "reference" else "tiled"
        out = attnzoo.attention(q, k, v, is_causal=causal, backend=backend)
        if not grad:
            return [out]
        out.backward(dout)
        return [out, q.grad, k.grad, v.grad]

    return call, (q, k, v), grad


def child(variant: str, n: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    pin_threads(threads)
    call, inputs, grad = make_call(variant, n)
    with torch.set_grad_enabled(grad):
        kept = call()  # warm-up: thread pools, lazy library state
        del kept
        for t in inputs:
            t.grad = None
        release_free_memory()
        before = status_bytes("VmRSS")
        if before is None or not reset_peak():
            return {"error": "VmHWM not available (needs Linux /proc/self/status and /proc/self/clear_refs)"}
        start = time.perf_counter()
        kept = call()
        seconds = time.perf_counter() - start
        peak, after = status_bytes("VmHWM"), status_bytes("VmRSS")
    returned = sum(t.numel() * t.element_size() for t in kept)
    return {"extra_peak": peak - before, "returned": returned, "retained_rss": after - before, "seconds": seconds}


def measure(variant: str, n: int, threads: int, reps: int, env: dict[str, str]) -> dict:
    runs = child_runs([__file__, "--variant", variant, "--n", str(n), "--threads", str(threads)], reps, env)
    if isinstance(runs, dict):
        return runs
    extra = [r["extra_peak"] for r in runs]
    return {
        "extra_peak": statistics.median(extra),
        "extra_min": min(extra),
        "extra_max": max(extra),
        "returned": runs[0]["returned"],
        "retained_rss": statistics.median(r["retained_rss"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
    }


def print_table(rows: list[dict]) -> None:
    cols = [
        "variant",
        "N",
        "extra peak MiB (incl. returned)",
        "% of N×N fp32",
        "pass/fail vs 10%",
        "returned MiB",
        "extra peak MiB (excl. returned)",
        "% excl.",
        "min–max MiB",
        "RSS kept after MiB",
        "call s",
    ]
    md_header(cols)
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['n']} | {r['error']} |" + " |" * (len(cols) - 3))
            continue
        nn_bytes = r["n"] * r["n"] * 4
        incl, excl = r["extra_peak"], r["extra_peak"] - r["returned"]
        pct, pct_excl = 100 * incl / nn_bytes, 100 * excl / nn_bytes
        if r["variant"] in ("tiled", "tiled-causal"):
            verdict = "PASS" if pct < TARGET_PCT else f"FAIL (+{pct - TARGET_PCT:.1f} pts)"
        elif r["variant"] == "tiled-fwdbwd":
            verdict = "info (target is forward)"
        else:
            verdict = "context"
        cells = [
            VARIANTS[r["variant"]],
            str(r["n"]),
            f"{incl / MiB:.1f}",
            f"{pct:.1f}%",
            verdict,
            f"{r['returned'] / MiB:.1f}",
            f"{excl / MiB:.1f}",
            f"{pct_excl:.1f}%",
            f"{r['extra_min'] / MiB:.1f}–{r['extra_max'] / MiB:.1f}",
            f"{r['retained_rss'] / MiB:.1f}",
            f"{r['seconds']:.2f}",
        ]
        md_row(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8192", help="comma-separated N (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="subprocesses per cell, median shown (default 3)")
    parser.add_argument("--reference-n", type=int, default=4096, help="N of the reference row; 0 skips it")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        metavar="BYTES",
        help="diagnostic: set glibc MALLOC_MMAP_THRESHOLD_ in the subprocesses, so blocks above it are mmapped "
        "and unmapped on free: the peak of live tensors, without the heap's retention (default: unset)",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        print("RESULT " + json.dumps(child(args.variant, args.n, args.threads)), flush=True)
        return
    pin_threads(args.threads)
    print(f"# Extra peak RSS of one attention call (B={B}, H={H}, D={D}, float32, CPU)\n\n{header()}\n")
    print(
        f"Settings: fresh subprocess per measurement, median of {args.reps}; warm-up call, gc + malloc_trim, "
        "VmRSS before, clear_refs=5, one call, VmHWM. Extra peak = VmHWM - VmRSS_before. "
        "'returned' = output (+ q/k/v grads for fwd+bwd). Target: tiled forward at N=8192, "
        f"extra peak incl. output < {TARGET_PCT:g}% of one N×N fp32 matrix. C allocator: "
        + (f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (diagnostic)" if args.mmap_threshold else "default")
        + "\n",
        flush=True,
    )
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    jobs = [(v, int(n)) for n in args.sizes.split(",") for v in VARIANTS if v != "reference"]
    if args.reference_n:
        jobs.append(("reference", args.reference_n))
    rows = []
    for variant, n in jobs:
        print(f"measuring {variant} N={n} ...", file=sys.stderr, flush=True)
        rows.append({"variant": variant, "n": n, **measure(variant, n, args.threads, args.reps, env)})
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"header": header(), "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
