"""Speed of the block-sparse engine and methods on CPU (B=1, H=8, D=64, float32, N=8192 by default).

Rows (ratios of median times attnzoo / baseline measured in one process, variants interleaved):
  kernel      the block kernel alone on fixed layouts: achieved GFLOP/s over the FLOPs of the
              visited blocks (4 * D per score) as a fraction of dense SDPA's GFLOP/s in the same
              run (target >= 0.5); layouts: random per-head blocks of 128 (6 per row), bigbird's
  bigbird     default bigbird (blocks of 64: window 3, 1+1 global, 3 random, ~10% of blocks at
              N=8192) forward vs dense SDPA (target <= 0.20); forward+backward vs SDPA fwd+bwd (info)
  moba        causal, block 128, top_k=4 (of 64 blocks), forward including the selection vs causal
              SDPA (target <= 0.25); the selection step alone (``select``) as a share of the
              method's time (target <= 0.15)
  xattention  causal, block 128, stride 8, threshold 0.9: the density it reports and its time vs
              causal SDPA (info); the selection's share
  others      longformer, strided, subsampled, cca, pbs at their defaults vs dense (or causal)
              SDPA (info), with their reported density where they report one

Before timing, every method is checked against its own float64 dense reference
(``backend="reference"``) on the same parameters at N=1024 (max abs error > 1e-4: WRONG, not
timed); the kernel row is checked against a float64 masked softmax on 256 query rows.

Run (from the repository root; a few minutes):
    .venv/bin/python benchmarks/block_sparse.py [--n 8192] [--threads 2] [--rounds 7] [--rows kernel,moba]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import fmt_time, header, interleaved, md_header, md_row, pin_threads

import attnzoo
from attnzoo import BlockLayout
from attnzoo.api import prepare
from attnzoo.kernels.blocksparse import block_attention

H, D = 8, 64
TOL = 1e-4
CHECK_N = 1024


class Wrong(Exception):
    pass


def randn(n: int, grad: bool = False, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def check_method(method: str, causal: bool, params: dict, notes: list[str]) -> None:
    """The method against its float64 reference at N=CHECK_N."""
    q, k, v = (t.double() for t in randn(CHECK_N, seed=1))
    with torch.no_grad():
        fast = attnzoo.attention(q.float(), k.float(), v.float(), is_causal=causal, method=method, **params)
        ref = attnzoo.attention(q, k, v, is_causal=causal, method=method, backend="reference", **params)
    err = (fast.double() - ref).abs().max().item()
    notes.append(f"{method} {params}: max abs error vs float64 reference at N={CHECK_N}: {err:.1e}")
    if not err <= TOL:
        raise Wrong(f"{method} WRONG: error {err:.2e} > {TOL}; not timed")


def flops(layout: BlockLayout) -> float:
    return layout.density() * layout.q_len * layout.kv_len * 4 * D * H


def sdpa(causal: bool):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def zoo(method: str, causal: bool, params: dict):
    return lambda q, k, v: attnzoo.attention(q, k, v, is_causal=causal, method=method, **params)


def density_of(method: str, causal: bool, params: dict, q, k, v) -> float | None:
    with attnzoo.collect_stats() as stats, torch.no_grad():
        attnzoo.attention(q, k, v, is_causal=causal, method=method, **params)
    found = [s["density"] for s in stats if "density" in s]
    return sum(found) / len(found) if found else None


def result(row, what, stats, base, target=None, better="lower", **extra) -> dict:
    ratio = stats.median / base.median
    met = None if target is None else (ratio <= target if better == "lower" else ratio >= target)
    return {"row": row, "what": what, "median": stats.median, "min": stats.min, "ratio": ratio, "target": target,
            "met": met, **extra}  # fmt: skip


def row_kernel(n: int, args, notes: list[str]) -> list[dict]:
    q, k, v = randn(n)
    gen = torch.Generator().manual_seed(0)
    nb = n // 128
    rand = torch.stack([torch.randperm(nb, generator=gen)[:6] for _ in range(H * nb)]).view(1, H, nb, 6)
    layouts = {"random blocks of 128, 6 per row, per head": BlockLayout.from_block_lists(rand, n, n, 128)}
    try:
        from attnzoo.methods.fixed_sparse import bigbird_layout

        _, call, p = prepare(q, k, v, method="bigbird")
        layouts["bigbird layout (blocks of 64)"] = bigbird_layout(call, p)
    except ImportError:
        notes.append("bigbird not available: kernel row on the random layout only")
    for name, layout in layouts.items():  # correctness on the first 256 query rows
        out, _ = block_attention(q.double(), k.double(), v.double(), layout, D**-0.5)
        qb = 256 // layout.block_size[0]
        head = [t[:, :, :qb] for t in (layout.kv_indices, layout.kv_num_blocks, layout.full)]
        rows256 = BlockLayout(256, n, layout.block_size, *head, layout.mask_mod)  # the first 256 query rows
        visible = rows256.expand_groups(1, H).to_dense()
        ref = F.scaled_dot_product_attention(q.double()[:, :, :256], k.double(), v.double(), attn_mask=visible)
        err = (out[:, :, :256] - ref).abs().max().item()
        if not err <= TOL:
            raise Wrong(f"kernel on {name} WRONG: {err:.2e}")
        notes.append(f"kernel on {name}: max abs error (256 rows, float64) {err:.1e}")
    variants = {"sdpa": lambda: sdpa(False)(q, k, v)}
    for name, layout in layouts.items():
        variants[name] = lambda layout=layout: block_attention(q, k, v, layout, D**-0.5)
    with torch.no_grad():
        stats = interleaved(variants, args.rounds)
    dense_gflops = 4 * n * n * D * H / stats["sdpa"].median / 1e9
    out = []
    for name, layout in layouts.items():
        gflops = flops(layout) / stats[name].median / 1e9
        r = result("kernel", f"{name}: GFLOP/s on visited blocks / dense SDPA GFLOP/s", stats[name], stats["sdpa"],
                   density=layout.density(), gflops=gflops, dense_gflops=dense_gflops)  # fmt: skip
        r["ratio"], r["target"], r["better"] = gflops / dense_gflops, 0.5, "higher"
        r["met"] = r["ratio"] >= 0.5
        out.append(r)
    return out


def row_method(row: str, n: int, args, notes: list[str], method: str, causal: bool, params: dict,
               target: float | None, fwdbwd: bool = False) -> list[dict]:  # fmt: skip
    check_method(method, causal, params, notes)
    q, k, v = randn(n)
    fn, base = zoo(method, causal, params), sdpa(causal)
    density = density_of(method, causal, params, q, k, v)
    variants = {method: lambda: fn(q, k, v), "sdpa": lambda: base(q, k, v)}
    select = getattr(sys.modules.get(attnzoo.get_method(method).reference.__module__), "select", None)
    if select is not None:
        _, call, p = prepare(q, k, v, is_causal=causal, method=method, **params)
        variants["select"] = lambda: select(call, p)
    with torch.no_grad():
        stats = interleaved(variants, args.rounds)
    base_name = "causal SDPA" if causal else "dense SDPA"
    out = [result(row, f"{method} {params} forward vs {base_name}", stats[method], stats["sdpa"], target,
                  density=density)]  # fmt: skip
    if select is not None:
        share = stats["select"].median / stats[method].median
        out.append({"row": row, "what": f"{method} selection step / method time", "median": stats["select"].median,
                    "min": stats["select"].min, "ratio": share, "target": 0.15 if row == "moba" else None,
                    "met": share <= 0.15 if row == "moba" else None})  # fmt: skip
    if fwdbwd:
        qg, kg, vg = randn(n, grad=True)
        dout = torch.randn_like(qg)

        def step(f):
            def call():
                qg.grad = kg.grad = vg.grad = None
                f(qg, kg, vg).backward(dout)

            return call

        stats = interleaved({method: step(fn), "sdpa": step(base)}, max(3, args.rounds // 2), warmup=1)
        out.append(result(row, f"{method} forward+backward vs {base_name} fwd+bwd", stats[method], stats["sdpa"]))
    return out


def rows(n: int) -> dict:
    return {
        "kernel": lambda args, notes: row_kernel(n, args, notes),
        "bigbird": lambda args, notes: row_method("bigbird", n, args, notes, "bigbird", False, {}, 0.20, True),
        "moba": lambda args, notes: row_method(
            "moba", n, args, notes, "moba", True, {"block_size": 128, "top_k": 4}, 0.25
        ),
        "xattention": lambda args, notes: row_method(
            "xattention", n, args, notes, "xattention", True, {"block_size": 128, "stride": 8, "threshold": 0.9}, None
        ),
        "others": lambda args, notes: [
            r
            for method, causal in [
                ("longformer", False),
                ("strided", True),
                ("subsampled", False),
                ("cca", True),
                ("pbs", True),
            ]
            if method in {m.name for m in attnzoo.methods()}
            for r in row_method("others", n, args, notes, method, causal, {}, None)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="kernel,bigbird,moba,xattention,others")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pin_threads(args.threads)
    table = rows(args.n)
    unknown = [r for r in args.rows.split(",") if r not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {list(table)}")
    print(header())
    print(f"B=1, H={H}, N={args.n}, D={D}, float32, {args.rounds} interleaved rounds\n")
    results, notes = [], []
    for name in args.rows.split(","):
        try:
            results.extend(table[name](args, notes))
        except Wrong as error:
            results.append({"row": name, "what": str(error), "ratio": None, "met": False})
        except Exception as error:  # report and go on with the other rows
            traceback.print_exc()
            results.append(
                {"row": name, "what": f"failed: {type(error).__name__}: {error}", "ratio": None, "met": False}
            )
        sys.stdout.flush()
    md_header(["row", "measurement", "median", "ratio", "target", "met", "density"])
    for r in results:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3f}"
        target = "" if r.get("target") is None else ("≥ " if r.get("better") == "higher" else "≤ ") + f"{r['target']}"
        dens = "" if r.get("density") is None else f"{r['density']:.3f}"
        median = fmt_time(r["median"]) if "median" in r else ""
        met = "" if r.get("met") is None else ("yes" if r["met"] else "NO")
        md_row([r["row"], r["what"], median, ratio, target, met, dens])
    print()
    for note in notes:
        print("-", note)
    if args.json:
        args.json.write_text(
            json.dumps({"header": header(), "n": args.n, "results": results, "notes": notes}, indent=1)
        )


if __name__ == "__main__":
    main()
