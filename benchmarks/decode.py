"""Decode state size and per-token step time of every causal method (``attnzoo.step``) on CPU.

What: for each method with the ``decode`` capability (from the registry), at N = 512 and 2048
tokens already decoded: the bytes its state holds (``state.size_bytes()``, checked equal to
``attnzoo.state_size(...) * 4``) and the median time of one single-token step after them.
B=1, Hq=Hkv=4, D=64, float32. Parameters: the method's first ``test_params``, its ``call_params``
(cosformer's ``max_len``) and, for sparse methods, its ``budget`` for 256 keys per query at that N.

How: one prefill step of N - 1 tokens (not timed), then the step of token N repeated on the same
state (steps are functional: the state is not consumed) ``--reps`` times; median shown.

Run (from the repository root; about a minute on 2 cores):
    .venv/bin/python benchmarks/decode.py [--threads 2] [--reps 15] [--lengths 512,2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import fmt_time, md_header, md_row

import attnzoo
from attnzoo.decode import decode_semantics
from attnzoo.inputs import build_call

B, H, D, KEYS = 1, 4, 64, 256


def params_for(spec: attnzoo.Method, n: int) -> dict:
    """The first test parameters, call-dependent defaults and a 256-key budget (where the method has one)."""
    x = torch.zeros(B, H, n, D)
    call = build_call(x, x, x, None, 0.0, True, None, False, None, False, False, spec.capabilities.spatial_dims)
    params = dict(spec.test_params[0])  # a valid base (sigmoid's decoder needs a fixed bias)
    if spec.call_params is not None:
        params.update(spec.call_params(call))
    if spec.budget is not None:
        params.update(spec.budget(call, KEYS))
    return params


def measure(spec: attnzoo.Method, n: int, reps: int) -> tuple[int, float, dict]:
    """``(state bytes after n tokens, median seconds of the n-th token's step, params)``."""
    params = params_for(spec, n)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    if spec.shared_query:  # one query token per head (aaren)
        q = q[:, :, :1].expand_as(q)
    state = attnzoo.init_state(spec.name, batch=B, kv_heads=H, head_dim=D, **params)
    _, state = attnzoo.step(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], state)
    attnzoo.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _, after = attnzoo.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
        times.append(time.perf_counter() - start)
    size = after.size_bytes()
    expected = attnzoo.state_size(spec.name, n, kv_heads=H, head_dim=D, **params) * B * 4
    if size != expected:
        raise AssertionError(f"{spec.name}: state holds {size} bytes, state_size gives {expected}")
    return size, statistics.median(times), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--lengths", default="512,2048")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, B={B}, Hq=Hkv={H}, D={D}, float32\n")
    cols = ["method", "semantics"] + [f"state N={n}" for n in lengths] + [f"step N={n}" for n in lengths]
    md_header(cols)
    for spec in attnzoo.methods():
        if not (spec.capabilities.decode and spec.capabilities.causal):
            continue
        with torch.no_grad():
            rows = [measure(spec, n, args.reps) for n in lengths]
        semantics = decode_semantics(spec.name, **rows[-1][2])
        sizes = [f"{size / 1024:.0f} KiB" for size, _, _ in rows]
        md_row([spec.name, semantics, *sizes, *(fmt_time(t) for _, t, _ in rows)])


if __name__ == "__main__":
    main()
