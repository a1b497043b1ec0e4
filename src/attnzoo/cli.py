"""The ``attnzoo`` command: list, info, check, explain, docs, and the arena's arena, report, compare."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from .api import attention, explain
from .params import parse_value
from .registry import FAMILIES, get_method, methods

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    rows = [["method", "family", "exact", "capabilities", "backends"]]
    for m in methods(args.family):
        rows.append(
            [m.name, m.family, "yes" if m.exact else "no", ",".join(m.capabilities.flags()), ",".join(m.backend_names)]
        )
    print(_table(rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    m = get_method(args.method)
    kind = "exact" if m.exact else "approximate"
    print(f"{m.name}: family {m.family}, {kind} attention\n\n{m.summary}\n")
    print(f"paper: {m.paper.title}\n       {m.paper.url}")
    print(f"capabilities: {', '.join(m.capabilities.flags())}\n")
    infos = m.params.describe()
    if infos:
        print(
            _table(
                [["parameter", "type", "default", "meaning"]]
                + [[i.name, i.type, repr(i.default), i.doc] for i in infos]
            )
        )
    else:
        print("parameters: none")
    print("\nbackends (dispatch order):")
    for b in m.backends:
        requires = f" [requires {', '.join(b.requires)}]" if b.requires else ""
        print(f"  {b.name}: {b.description}{requires}")
    print("  reference: the dense readable reference (only when forced)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .testing import run_checks
    from .testing.bad_inputs import bad_inputs
    from .testing.conformance import CheckResult

    names = args.methods or [m.name for m in methods()]
    for name in names:
        get_method(name)
    results: list[CheckResult] = []
    for name in names:
        results += run_checks([name], quick=not args.extended)
        for entry in bad_inputs(get_method(name)):
            call_args, kwargs = entry.build()
            try:
                attention(*call_args, **kwargs)
                passed, message = False, "no error raised"
            except Exception as error:
                passed = isinstance(error, entry.error) and entry.argument in str(error)
                message = "" if passed else f"{type(error).__name__}: {error}"
            results.append(CheckResult("bad_input", f"{name}-{entry.name}", passed, message))
    counts: Counter = Counter()
    for r in results:
        method = r.case_id.split("-")[0]
        counts[(method, r.check, r.passed)] += 1
    rows = [["method", "check", "passed", "failed"]]
    for method, check in sorted({(m, c) for m, c, _ in counts}):
        rows.append([method, check, str(counts[(method, check, True)]), str(counts[(method, check, False)])])
    print(_table(rows))
    failures = [r for r in results if not r.passed]
    for r in failures:
        print(f"FAIL {r.check} {r.case_id}: {r.message}")
    print(f"{len(results) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,1024,64, got {text!r}") from None
    if len(shape) < 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,H,N,D (or B,H,*spatial,D) of positive sizes, got {text!r}")
    return shape


def _param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, parse_value(value)


def cmd_explain(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    kv_shape = args.kv_shape or args.shape

    def empty(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=args.device)

    v_shape = (*kv_shape[:-1], args.value_dim or kv_shape[-1])
    q, k, v = empty(args.shape), empty(kv_shape), empty(v_shape)
    print(explain(q, k, v, is_causal=args.causal, method=args.method, return_lse=args.lse, **dict(args.param)))
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from .docs import render_methods

    text = render_methods()
    path = Path(args.out)
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run `attnzoo docs` and commit it", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="Efficient attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered methods, families and capabilities")
    p.add_argument("--family", choices=FAMILIES)
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("info", help="a method's parameters, paper, capabilities and backends")
    p.add_argument("method")
    p.set_defaults(run=cmd_info)
    p = sub.add_parser("check", help="run the conformance checks here; exit 1 on failure")
    p.add_argument("methods", nargs="*", help="methods to check (default: all)")
    p.add_argument("--extended", action="store_true", help="every size, not the quick rotation")
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("explain", help="which backend runs a call and why the others would not")
    p.add_argument("method")
    p.add_argument("--shape", type=_shape, required=True, help="query shape B,H,N,D")
    p.add_argument("--kv-shape", type=_shape, help="key/value shape (default: --shape)")
    p.add_argument("--value-dim", type=int, help="value head size (default: the key's)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--lse", action="store_true", help="ask for the log-sum-exp too")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE")
    p.set_defaults(run=cmd_explain)
    p = sub.add_parser("docs", help="write docs/methods.md from the registry")
    p.add_argument("--out", default="docs/methods.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    p.set_defaults(run=cmd_docs)
    from .arena.cli import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("arena", "report", "compare"):
        from .arena.cli import run_command

        return run_command(args)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"attnzoo {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
