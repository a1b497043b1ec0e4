"""Speed and memory of the local-attention methods (``sliding_window``, ``neighborhood``) on CPU.

What: the acceptance numbers at B=1, H=8, D=64, float32, each as a ratio attnzoo / baseline of
median times (target: ratio <= X):
  swa-4096    sliding_window causal window=(255, 0), N=4096, forward: vs dense SDPA <= 0.20; vs
              causal SDPA (info); vs compiled FlexAttention with the same BlockMask <= 1.0 (the
              compile, i.e. the first call, is reported on its own line)
  swa-16384   the same at N=16384 vs causal SDPA <= 0.10
  swa-fwdbwd  forward+backward at N=4096 vs causal SDPA forward+backward <= 0.40
  na2d        neighborhood 64x64, kernel (13, 13), forward vs dense SDPA over the 4096 flattened
              tokens <= 0.25; vs NATTEN ``na2d`` <= 0.02 (>= 50x faster) when natten is installed;
              forward+backward (info)
  na3d        neighborhood 16x16x16, kernel (5, 5, 5), forward vs dense SDPA <= 0.20; fwd+bwd (info)
  memory      extra peak RSS of one sliding_window forward at N=4096/16384/65536: MiB, MiB per 1k
              tokens (linear growth) and % of one N x N float32 matrix, target < 2% at N=65536,
              including the returned output; causal SDPA for context

How: forward rows under ``torch.no_grad()``. Before timing, every attnzoo output is checked
against float64 ``F.scaled_dot_product_attention`` with the equivalent dense bool mask (causal band;
NATTEN semantics: per dim the window starts at clamp(x - K//2, 0, L - K) and holds K positions):
all heads and rows up to N=4096, else head 0 and query rows [0:512] and [N-512:N]. Max abs error
> 1e-4 reports WRONG and skips the timing; fwd+bwd rows also check the input gradients (head 0,
float64 autograd, error / max(1, max |ref|)). A row's variants run interleaved round-robin
(``_timing.interleaved``); median and min shown. NATTEN is timed in its own loop of 3 calls vs
the attnzoo median of the same process. Memory: the ``tiled_memory.py`` protocol (fresh
subprocess, warm-up, gc + malloc_trim, clear_refs=5, VmHWM - VmRSS_before), median of
``--mem-reps`` subprocesses (SDPA: 1; ~30 s a call at N=65536 on 2 cores).

Run (from the repository root; about 10 minutes with the FlexAttention compile):
    .venv/bin/python benchmarks/local_attention.py [--threads 2] [--rounds 10] [--rows swa-4096,na2d]
        [--no-flex] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import (
    MiB,
    Stats,
    child_runs,
    fmt_time,
    header,
    interleaved,
    md_header,
    md_row,
    pin_threads,
    release_free_memory,
    reset_peak,
    status_bytes,
)

import attnzoo as az

B, H, D = 1, 8, 64
WINDOW = (255, 0)
TOL = 1e-4
ROWS = ("swa-4096", "swa-16384", "swa-fwdbwd", "na2d", "na3d", "memory")
NEEDS = {"na2d": "neighborhood", "na3d": "neighborhood"}  # every other row needs sliding_window
MEM_TARGET_PCT, MEM_TARGET_N = 2.0, 65536


def randn(shape: tuple[int, ...], grad: bool = False, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).requires_grad_(grad) for _ in range(4)]  # q, k, v, dout


def flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, *spatial, D] -> [B, H, N, D] (a view)."""
    return t.flatten(2, -2)


# ---- masks (True = visible), as functions of a query-row range -------------------------------


def band_rows(n: int):
    def rows(r0: int, r1: int) -> torch.Tensor:
        i, j = torch.arange(r0, r1)[:, None], torch.arange(n)[None]
        return (j <= i) & (i - j <= WINDOW[0])

    return rows


def na_rows(spatial: tuple[int, ...], kernel: tuple[int, ...]):
    grids = torch.meshgrid(*(torch.arange(s) for s in spatial), indexing="ij")
    coords = torch.stack(grids, -1).reshape(-1, len(spatial))  # [N, ndim], row-major like flatten
    size, ks = torch.tensor(spatial), torch.tensor(kernel)
    start = torch.minimum((coords - ks // 2).clamp(min=0), size - ks)

    def rows(r0: int, r1: int) -> torch.Tensor:
        s = start[r0:r1, None]
        return ((coords[None] >= s) & (coords[None] < s + ks)).all(-1)

    return rows


# ---- the attnzoo calls under test ------------------------------------------------------------


def sliding_window(q, k, v):
    return az.attention(q, k, v, is_causal=True, method="sliding_window", window=WINDOW)


def neighborhood(kernel: tuple[int, ...]):
    return lambda q, k, v: az.attention(q, k, v, method="neighborhood", kernel_size=kernel)


def sdpa(causal: bool):
    return lambda q, k, v: F.scaled_dot_product_attention(flat(q), flat(k), flat(v), is_causal=causal).view(q.shape)


# ---- correctness -----------------------------------------------------------------------------


@torch.no_grad()
def max_err(out, q, k, v, mask_rows) -> float:
    """Max |out - float64 reference| (see the docstring for which heads and rows)."""
    out, q, k, v = (flat(t.detach()) for t in (out, q, k, v))
    n = q.shape[2]
    full = n <= 4096
    hs = slice(None) if full else slice(0, 1)
    chunks = [(r, min(r + 512, n)) for r in range(0, n, 512)] if full else [(0, 512), (n - 512, n)]
    err = 0.0
    for r0, r1 in chunks:
        qs, ks, vs = q[:, hs, r0:r1].double(), k[:, hs].double(), v[:, hs].double()
        ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask_rows(r0, r1))
        err = max(err, (out[:, hs, r0:r1].double() - ref).abs().max().item())
    return err


def grad_err(fn, q, k, v, dout, mask_rows) -> float:
    """Input gradients of ``fn`` vs float64 autograd on head 0, scaled by max(1, max |ref|)."""
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(dout)
    ref_in = [flat(t.detach()[:, :1]).double().requires_grad_() for t in (q, k, v)]
    n = ref_in[0].shape[2]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask_rows(0, n))
    ref.backward(flat(dout[:, :1]).double())
    errs = [
        (flat(t.grad[:, :1]).double() - r.grad).abs().max() / max(1.0, r.grad.abs().max())
        for t, r in zip((q, k, v), ref_in, strict=True)
    ]
    for t in (q, k, v):
        t.grad = None
    return max(e.item() for e in errs)


def fwdbwd(fn, q, k, v, dout):
    def call():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    return call


# ---- rows ------------------------------------------------------------------------------------


class Wrong(Exception):
    pass


def check(what: str, err: float, notes: list[str]) -> None:
    notes.append(f"{what}: max abs error vs float64 reference {err:.2e} (tolerance {TOL:g})")
    if not err <= TOL:
        raise Wrong(f"{what} WRONG: max abs error {err:.2e} > {TOL:g}; not timed")


def compare(row: str, stats, zoo: str, base: str, target: float | None) -> dict:
    z, b = stats[zoo], stats[base]
    ratio = z.median / b.median
    verdict = "info" if target is None else ("PASS" if ratio <= target else "FAIL")
    target_s = None if target is None else f"<= {target:g}x"
    times = dict(zoo_median_s=z.median, zoo_min_s=z.min, base_median_s=b.median, base_min_s=b.min)
    return dict(row=row, comparison=f"{zoo} / {base}", **times, ratio=ratio, target=target_s, verdict=verdict)


def flex_variant(q, k, v, n: int, notes: list[str]):
    """Compiled FlexAttention with the sliding_window BlockMask; None (and a note) if it cannot run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= WINDOW[0]), None, None, n, n, device="cpu"
        )
        fc = torch.compile(flex_attention, dynamic=False)
        start = time.perf_counter()
        out = fc(q, k, v, block_mask=block_mask)
        notes.append(f"flex: compile (first call) {time.perf_counter() - start:.1f} s (less if inductor cache warm)")
        notes.append(f"flex: max abs error vs float64 reference {max_err(out, q, k, v, band_rows(n)):.2e}")
        return lambda: fc(q, k, v, block_mask=block_mask)
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        notes.append(f"flex: unavailable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})")
        return None


def row_swa(row: str, n: int, args, notes: list[str]) -> list[dict]:
    q, k, v, _ = randn((B, H, n, D))
    with torch.no_grad():
        check(f"sliding_window N={n}", max_err(sliding_window(q, k, v), q, k, v, band_rows(n)), notes)
        variants = {"sliding_window": lambda: sliding_window(q, k, v), "sdpa causal": lambda: sdpa(True)(q, k, v)}
        if row == "swa-4096":
            variants["sdpa dense"] = lambda: sdpa(False)(q, k, v)
            if not args.no_flex and (fn := flex_variant(q, k, v, n, notes)):
                variants["flex"] = fn
            elif args.no_flex:
                notes.append("flex: skipped (--no-flex)")
        stats = interleaved(variants, args.rounds, args.warmup)
    if row == "swa-16384":
        return [compare(row, stats, "sliding_window", "sdpa causal", 0.10)]
    pairs = [("sdpa dense", 0.20), ("sdpa causal", None)] + [("flex", 1.0)] * ("flex" in variants)
    return [compare(row, stats, "sliding_window", base, target) for base, target in pairs]


def row_swa_fwdbwd(row: str, n: int, args, notes: list[str]) -> list[dict]:
    q, k, v, dout = randn((B, H, n, D), grad=True)
    with torch.no_grad():
        check(f"sliding_window N={n} forward", max_err(sliding_window(q, k, v), q, k, v, band_rows(n)), notes)
    check(f"sliding_window N={n} grads (head 0)", grad_err(sliding_window, q, k, v, dout, band_rows(n)), notes)
    variants = {
        "sliding_window fwd+bwd": fwdbwd(sliding_window, q, k, v, dout),
        "sdpa causal fwd+bwd": fwdbwd(sdpa(True), q, k, v, dout),
    }
    stats = interleaved(variants, args.rounds, args.warmup)
    return [compare(row, stats, "sliding_window fwd+bwd", "sdpa causal fwd+bwd", 0.40)]


def natten_ratio(row: str, q, k, v, kernel, zoo_out, zoo_stats, notes: list[str]) -> list[dict]:
    try:
        import natten
    except ImportError:
        notes.append("natten: not installed")
        return []
    nat = getattr(natten, f"na{len(kernel)}d")
    perm = (0, *range(2, 2 + len(kernel)), 1, len(kernel) + 2)  # [B, H, *S, D] -> [B, *S, H, D]
    qn, kn, vn = (t.permute(perm).contiguous() for t in (q, k, v))
    with torch.no_grad():
        out = nat(qn, kn, vn, kernel_size=kernel)
        back = (0, len(kernel) + 1, *range(1, len(kernel) + 1), len(kernel) + 2)  # and back
        err = (out.permute(back) - zoo_out).abs().max().item()
        if not err <= TOL:
            notes.append(f"natten: differs from attnzoo by {err:.2e} (> {TOL:g}); not timed")
            return []
        notes.append(f"natten: max abs difference from attnzoo {err:.2e}")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            nat(qn, kn, vn, kernel_size=kernel)
            times.append(time.perf_counter() - start)
    notes.append("natten: 3 calls in their own loop after the interleaved rounds; attnzoo median from those rounds")
    stats = {"neighborhood": zoo_stats, "natten": Stats(statistics.median(times), min(times), times)}
    return [compare(row, stats, "neighborhood", "natten", 0.02)]


def row_na(row: str, spatial: tuple[int, ...], kernel: tuple[int, ...], target: float, args, notes) -> list[dict]:
    fn, masks, n = neighborhood(kernel), na_rows(spatial, kernel), int(torch.tensor(spatial).prod())
    q, k, v, dout = randn((B, H, *spatial, D))
    with torch.no_grad():
        zoo_out = fn(q, k, v)
        check(f"neighborhood {spatial} K={kernel}", max_err(zoo_out, q, k, v, masks), notes)
        stats = interleaved(
            {"neighborhood": lambda: fn(q, k, v), "sdpa dense": lambda: sdpa(False)(q, k, v)}, args.rounds, args.warmup
        )
    res = [compare(row, stats, "neighborhood", "sdpa dense", target)]
    if row == "na2d":
        res += natten_ratio(row, q, k, v, kernel, zoo_out, stats["neighborhood"], notes)
    for t in (q, k, v):
        t.requires_grad_()
    check(f"neighborhood {spatial} grads (head 0, N={n})", grad_err(fn, q, k, v, dout, masks), notes)
    variants = {
        "neighborhood fwd+bwd": fwdbwd(fn, q, k, v, dout),
        "sdpa dense fwd+bwd": fwdbwd(sdpa(False), q, k, v, dout),
    }
    stats = interleaved(variants, args.rounds, args.warmup)
    return [*res, compare(row, stats, "neighborhood fwd+bwd", "sdpa dense fwd+bwd", None)]


# ---- memory ----------------------------------------------------------------------------------


def mem_child(variant: str, n: int) -> dict:
    """One measurement in this (fresh) process, as in tiled_memory.child."""
    q, k, v, _ = randn((B, H, n, D))
    fn = sliding_window if variant == "sliding_window" else sdpa(True)
    with torch.no_grad():
        out = fn(q, k, v)  # warm-up
        del out
        release_free_memory()
        before = status_bytes("VmRSS")
        if before is None or not reset_peak():
            return {"error": "VmHWM not available (needs Linux /proc/self/status and /proc/self/clear_refs)"}
        out = fn(q, k, v)
        peak = status_bytes("VmHWM")
    return {"extra_peak": peak - before, "returned": out.numel() * out.element_size()}


def mem_measure(variant: str, n: int, reps: int, args) -> dict:
    runs = child_runs([__file__, "--mem-child", variant, "--n", str(n), "--threads", str(args.threads)], reps)
    if isinstance(runs, dict):
        return runs
    extra = [r["extra_peak"] for r in runs]
    med, lo, hi = statistics.median(extra), min(extra), max(extra)
    return dict(extra_peak=med, extra_min=lo, extra_max=hi, returned=runs[0]["returned"])


def row_memory(args, notes: list[str]) -> list[dict]:
    rows = []
    for n in (int(s) for s in args.mem_sizes.split(",")):
        q, k, v, _ = randn((B, H, n, D))
        with torch.no_grad():
            check(f"sliding_window N={n}", max_err(sliding_window(q, k, v), q, k, v, band_rows(n)), notes)
        del q, k, v
        for variant, reps in (("sliding_window", args.mem_reps), ("sdpa causal", 1)):
            print(f"measuring memory: {variant} N={n} ...", file=sys.stderr, flush=True)
            rows.append({"variant": variant, "n": n, "reps": reps, **mem_measure(variant, n, reps, args)})
    cols = "variant|N|subprocesses|extra peak MiB (incl. output)|MiB per 1k tokens|% of N×N fp32|target|output MiB|"
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["variant"], r["n"], r["reps"], r["error"]] + [""] * 5)
            continue
        pct = 100 * r["extra_peak"] / (r["n"] * r["n"] * 4)
        r["pct_of_nn"], target = pct, "context"
        if r["variant"] == "sliding_window" and r["n"] == MEM_TARGET_N:
            target = r["verdict"] = ("PASS" if pct < MEM_TARGET_PCT else "FAIL") + f" (< {MEM_TARGET_PCT:g}%)"
        elif r["variant"] == "sliding_window":
            target = "info (target at N=65536)"
        mib = [f"{r[key] / MiB:.1f}" for key in ("extra_peak", "returned", "extra_min", "extra_max")]
        per_1k = f"{r['extra_peak'] / MiB / (r['n'] / 1024):.2f}"
        table.append(
            [r["variant"], r["n"], r["reps"], mib[0], per_1k, f"{pct:.3f}%", target, mib[1], "–".join(mib[2:])]
        )
    md_table((cols + "min–max MiB").split("|"), table)
    return rows


# ---- main ------------------------------------------------------------------------------------


def md_table(cols: list[str], rows: list[list]) -> None:
    md_header(cols)
    for cells in rows:
        md_row(cells)


def print_table(results: list[dict]) -> None:
    cols = "row|comparison|attnzoo median|attnzoo min|baseline median|baseline min|ratio (medians)|target|verdict"
    times = ("zoo_median_s", "zoo_min_s", "base_median_s", "base_min_s")
    cells = [[r["row"], r["comparison"], *(fmt_time(r[t]) for t in times), f"{r['ratio']:.3f}x"] for r in results]
    md_table(cols.split("|"), [[*c, r["target"] or "-", r["verdict"]] for c, r in zip(cells, results)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per row (default 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant (default 2; --quick: 1)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baseline")
    parser.add_argument("--mem-sizes", default="4096,16384,65536", help="N of the memory row")
    parser.add_argument("--mem-reps", type=int, default=3, help="subprocesses per sliding_window memory cell")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, 1 memory subprocess")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--mem-child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.mem_child:
        print("RESULT " + json.dumps(mem_child(args.mem_child, args.n)), flush=True)
        return
    if args.quick:
        args.rounds, args.warmup, args.mem_reps = 3, 1, 1
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")

    print(f"# Local attention (B={B}, H={H}, D={D}, float32, CPU)\n\n{header()}\n")
    settings = f"{args.rounds} interleaved rounds, {args.warmup} warm-up calls per variant, forward under no_grad"
    print(f"Settings: {settings}; ratio = attnzoo median / baseline median\n", flush=True)
    registered = {m.name for m in az.methods()}
    results, memory, notes_all = [], [], {}
    for row in rows:
        method = NEEDS.get(row, "sliding_window")
        notes: list[str] = notes_all.setdefault(row, [])
        if method not in registered:
            notes.append(f"SKIPPED: method {method!r} is not registered in attnzoo (registered: {sorted(registered)})")
        else:
            print(f"running {row} ...", file=sys.stderr, flush=True)
            try:
                if row in ("swa-4096", "swa-16384"):
                    results += row_swa(row, int(row.split("-")[1]), args, notes)
                elif row == "swa-fwdbwd":
                    results += row_swa_fwdbwd(row, 4096, args, notes)
                elif row == "na2d":
                    results += row_na(row, (64, 64), (13, 13), 0.25, args, notes)
                elif row == "na3d":
                    results += row_na(row, (16, 16, 16), (5, 5, 5), 0.20, args, notes)
                else:
                    print("## memory: extra peak RSS of one sliding_window forward\n")
                    memory = row_memory(args, notes)
                    print()
            except Wrong as e:
                notes.append(str(e))
            except Exception as e:
                notes.append(f"ERROR: {type(e).__name__}: {e}")
                traceback.print_exc()
        for note in notes:
            print(f"- {row}: {note}", flush=True)
    print()
    if results:
        print_table(results)
    if args.json:
        out = dict(header=header(), speed=results, memory=memory, notes=notes_all)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
