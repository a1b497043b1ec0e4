"""Linear and gated-recurrent attention on CPU (B=1, H=8, D=64, float32, 2 threads by default).

Rows (ratios of median times measured in one process, variants interleaved):
  speed      ``linear`` (elu+1 features, normalised) causal forward, chunkwise form, vs causal SDPA
             at N=4096 (target <= 0.25) and N=16384 (target <= 0.08); the core on the same
             features vs flash-linear-attention's ``naive_chunk_linear_attn`` (the optional peer,
             ``pip install -e .[peers]``; target: ours >= 2x faster)
  forms      ``gla`` (diagonal gates) and ``delta`` (with beta) chunkwise vs their own recurrent form
             (the registry reference) at N=4096, forward (target >= 3x)
  decode     one-token ``attnzoo.step`` after a prefill of 1024 and of 65536 tokens, for every
             causal method with an O(1) state (target: within 1.2x)
  memory     peak extra memory (VmHWM in a fresh process) of the ``linear`` causal forward and of
             forward+backward at N = 4096, 16384, 65536 (target O(N): MiB per 1k tokens flat)
  performer  error of ``performer`` vs exact softmax attention as the number of features grows
             (16..1024; mean over 3 seeds of the relative Frobenius error), causal and not
  leak       every causal linear-family method: max change of past outputs when future keys are
             scaled by 30 and future values by 1e3 (must be 0)

Before timing, each timed method is checked against its float64 reference at N=256.

Run (from the repository root; about 5 minutes):
    .venv/bin/python benchmarks/linear.py [--threads 2] [--rounds 7] [--rows speed,forms] [--json out.json]
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

from _timing import (
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

import attnzoo
from attnzoo.kernels.linear import linear_attention
from attnzoo.registry import get_method
from attnzoo.testing.cases import sampled_params
from attnzoo.testing.conformance import check_causality

H, D = 8, 64
ROWS = ("speed", "forms", "decode", "memory", "performer", "leak")
MiB = 2**20


def randn(n: int, seed: int = 0, heads: int = H) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, D, generator=g) for _ in range(3)]


def method_inputs(method: str, q: torch.Tensor) -> dict:
    """Data-dependent parameters (gates, betas) for a call, from the method's own sampler."""
    return sampled_params(get_method(method), q, q, q, 0)


def checked(method: str, params: dict, notes: list[str]) -> None:
    q, k, v = (t.double() for t in randn(256, seed=1, heads=2))
    extra = method_inputs(method, q)
    with torch.no_grad():
        fast = attnzoo.attention(q.float(), k.float(), v.float(), is_causal=True, method=method, **params, **extra)
        ref = attnzoo.attention(q, k, v, is_causal=True, method=method, backend="reference", **params, **extra)
    err = (fast.double() - ref).abs().max().item()
    notes.append(f"{method}: max abs error vs its float64 reference at N=256: {err:.1e}")
    if not err <= 1e-4:
        raise SystemExit(f"{method} WRONG (error {err:.2e}); not timed")


def ratio_row(name: str, stats, ours: str, base: str, target: str, ok) -> list:
    r = stats[ours].median / stats[base].median
    verdict = "" if ok is None else ("met" if ok(r) else "NOT met")
    return [name, fmt_time(stats[ours].median), fmt_time(stats[base].median), f"{r:.3f}", target, verdict]


def row_speed(args, notes) -> list[list]:
    checked("linear", {}, notes)
    rows = []
    try:
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn
    except Exception as error:  # the optional peer (and its triton import) may be missing
        naive_chunk_linear_attn = None
        notes.append(f"flash-linear-attention not importable ({type(error).__name__}): peer row skipped")
    for n, target in ((4096, 0.25), (16384, 0.08)):
        q, k, v = randn(n)
        qf, kf = F.elu(q) + 1, F.elu(k) + 1
        variants = {
            "linear": lambda q=q, k=k, v=v: attnzoo.attention(q, k, v, is_causal=True, method="linear"),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "core": lambda qf=qf, kf=kf, v=v: linear_attention(qf, kf, v, normalize=True, chunk_size=64),
        }
        if naive_chunk_linear_attn is not None:
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (qf, kf, v))
            ref = naive_chunk_linear_attn(qt, kt, vt, normalize=True).transpose(1, 2)
            err = (ref - linear_attention(qf, kf, v, normalize=True)[0]).abs().max().item()
            notes.append(f"fla naive_chunk_linear_attn vs our core at N={n}: max abs difference {err:.1e}")
            variants["fla"] = lambda qt=qt, kt=kt, vt=vt: naive_chunk_linear_attn(qt, kt, vt, normalize=True)
        with torch.no_grad():
            stats = interleaved(variants, args.rounds, args.warmup)
        rows.append(
            ratio_row(f"linear causal fwd, N={n}", stats, "linear", "sdpa", f"<= {target}", lambda r, t=target: r <= t)
        )
        if "fla" in stats:
            rows.append(
                ratio_row(f"core vs fla naive chunk, N={n}", stats, "core", "fla", "<= 0.5", lambda r: r <= 0.5)
            )
    return rows


def row_forms(args, notes) -> list[list]:
    rows = []
    for method in ("gla", "delta"):
        checked(method, {}, notes)
        q, k, v = randn(4096)
        extra = method_inputs(method, q)

        def run(backend, q=q, k=k, v=v, method=method, extra=extra):
            return attnzoo.attention(q, k, v, is_causal=True, method=method, backend=backend, **extra)

        variants = {"chunk": lambda run=run: run("chunk"), "recurrent": lambda run=run: run("reference")}
        with torch.no_grad():
            stats = interleaved(variants, max(3, args.rounds // 2), 1)
        rows.append(
            ratio_row(
                f"{method} chunk vs recurrent, N=4096", stats, "chunk", "recurrent", "<= 0.33", lambda r: r <= 1 / 3
            )
        )
    return rows


def decode_methods() -> list[str]:
    names = []
    for spec in attnzoo.methods("linear"):
        if spec.capabilities.decode and spec.capabilities.state:
            names.append(spec.name)
    return names


def row_decode(args, notes) -> list[list]:
    rows = []
    for method in decode_methods():
        params = {"max_len": 70000} if method == "cosformer" else {}
        timers = {}
        for prefill in (1024, 65536):
            q, k, v = randn(prefill, heads=H)
            extra = method_inputs(method, q)
            with torch.no_grad():
                _, state = attnzoo.attention(
                    q, k, v, is_causal=True, method=method, return_state=True, **params, **extra
                )
            dstate = attnzoo.init_state(method, batch=1, kv_heads=H, head_dim=D, initial_state=state, **params)
            q1, k1, v1 = (t[:, :, :1].clone() for t in randn(1, seed=3))
            step_extra = {n: t[:, :, :1] for n, t in method_inputs(method, q1).items()}
            timers[prefill] = lambda s=dstate, q1=q1, k1=k1, v1=v1, e=step_extra: attnzoo.step(q1, k1, v1, s, **e)
        with torch.no_grad():
            stats = interleaved({str(p): f for p, f in timers.items()}, args.rounds * 3, 5, inner=20)
        r = stats["65536"].median / stats["1024"].median
        rows.append(
            [
                f"{method} step at 65536 vs at 1024",
                fmt_time(stats["65536"].median),
                fmt_time(stats["1024"].median),
                f"{r:.3f}",
                "<= 1.2",
                "met" if r <= 1.2 else "NOT met",
            ]
        )
    return rows


def mem_child(variant: str, n: int) -> dict:
    q, k, v = randn(n)
    backward = variant == "fwd+bwd"

    def call():
        if not backward:
            with torch.no_grad():
                return attnzoo.attention(q, k, v, is_causal=True, method="linear")
        for t in (q, k, v):
            t.grad = None
            t.requires_grad_()
        out = attnzoo.attention(q, k, v, is_causal=True, method="linear")
        out.sum().backward()
        return out.detach()

    out = call()  # warm-up
    del out
    for t in (q, k, v):
        t.grad = None
    release_free_memory()
    before = status_bytes("VmRSS")
    if before is None or not reset_peak():
        return {"error": "VmHWM not available (needs Linux /proc/self/status and /proc/self/clear_refs)"}
    out = call()
    peak = status_bytes("VmHWM")
    return {"extra_peak": peak - before, "output": out.numel() * out.element_size()}


def row_memory(args, notes) -> list[list]:
    rows = []
    for variant in ("fwd", "fwd+bwd"):
        for n in (4096, 16384, 65536):
            print(f"memory: linear {variant} N={n} ...", file=sys.stderr, flush=True)
            cmd = [__file__, "--mem-child", variant, "--n", str(n), "--threads", str(args.threads)]
            runs = child_runs(cmd, args.mem_reps)
            if isinstance(runs, dict):
                rows.append([f"linear causal {variant}, N={n}", runs["error"], "", "", "", ""])
                continue
            extra = statistics.median(r["extra_peak"] for r in runs)
            inputs = 3 * n * H * D * 4
            rows.append(
                [
                    f"linear causal {variant}, N={n}",
                    f"{extra / MiB:.1f} MiB",
                    f"{extra / MiB / (n / 1024):.2f} MiB/1k",
                    f"{extra / inputs:.2f}x q+k+v",
                    "O(N)",
                    "",
                ]
            )
    return rows


def row_performer(args, notes) -> list[list]:
    rows = []
    for causal in (False, True):
        errors = {}
        for m in (16, 32, 64, 128, 256, 512, 1024):
            errs = []
            for seed in range(3):
                q, k, v = (t.double() * 0.5 for t in randn(512, seed=seed, heads=4))
                exact = attnzoo.attention(q, k, v, is_causal=causal)
                approx = attnzoo.attention(q, k, v, is_causal=causal, method="performer", num_features=m, seed=seed)
                errs.append(((approx - exact).norm() / exact.norm()).item())
            errors[m] = statistics.mean(errs)
        rows.append([f"performer {'causal' if causal else 'non-causal'}"] + [f"{errors[m]:.3f}" for m in errors])
    return rows


def row_leak(args, notes) -> list[list]:
    rows = []
    for spec in attnzoo.methods("linear"):
        if not spec.capabilities.causal:
            continue
        for backend in [*spec.backend_names, "reference"]:
            result = check_causality(get_method(spec.name), backend, dict(spec.test_params[0]))
            worst = result.errors["past outputs"][0]
            rows.append([spec.name, backend, f"{worst:.1e}", "pass" if result.passed else "LEAK"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-reps", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mem-child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.mem_child:
        print("RESULT " + json.dumps(mem_child(args.mem_child, args.n)))
        return
    print(header())
    notes: list[str] = []
    results = {}
    for row in args.rows.split(","):
        print(f"\n## {row}\n", flush=True)
        table = globals()[f"row_{row}"](args, notes)
        results[row] = table
        if row == "performer":
            md_header(["variant", *(f"{m} features" for m in (16, 32, 64, 128, 256, 512, 1024))])
        elif row == "leak":
            md_header(["method", "backend", "max change of past outputs", "verdict"])
        else:
            md_header(["measurement", "ours", "baseline", "ratio", "target", ""])
        for cells in table:
            md_row(cells)
    print("\nChecks:")
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({"header": header(), "rows": results, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
