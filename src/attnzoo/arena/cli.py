"""The arena's commands: ``attnzoo arena``, ``attnzoo report`` and ``attnzoo compare``.

Exit codes: 0 done, 1 ``compare`` found a regression, 2 a request refused before anything ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .runner import DEFAULT_DB, DEFAULT_OUT, SUITES, ArenaConfig, ArenaError, run
from .store import StoreError


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 512,1024, got {text!r}") from None
    return sizes


def cmd_arena(args: argparse.Namespace) -> int:
    config = ArenaConfig(
        suites=args.suite,
        methods=args.methods,
        sizes=args.sizes,
        quick=args.quick,
        db=Path(args.db),
        out=None if args.no_report else Path(args.out),
        threads=ArenaConfig().threads if args.threads is None else args.threads,
        peers=not args.no_peers,
    )
    summary = run(config)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items())) or "nothing new"
    print(
        f"arena: {summary.measured} cells measured ({counts}), {summary.skipped} already stored, "
        f"in {summary.seconds:.0f} s; database {config.db}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runner import check_writable
    from .store import Store

    with Store(Path(args.db), readonly=True) as store:
        check_writable(Path(args.out))
        paths = write_report(store, Path(args.out))
    print(f"report written to {paths.markdown} and {paths.html}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, format_comparison

    if args.fail_if_slower is not None and args.fail_if_slower < 0:
        raise ArenaError(f"--fail-if-slower: expected a percentage >= 0, got {args.fail_if_slower}")
    result = compare(Path(args.old), Path(args.new), fail_if_slower=args.fail_if_slower)
    print(format_comparison(result, Path(args.old), Path(args.new)))
    return 1 if result.regressions else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("arena", help="run the benchmark suites into a database and write the report")
    p.add_argument("--suite", type=_names, default=SUITES, help=f"comma-separated suites (default: {','.join(SUITES)})")
    p.add_argument("--methods", type=_names, help="comma-separated methods (default: every registered method)")
    p.add_argument(
        "--sizes",
        type=_sizes,
        help="comma-separated sequence lengths (default: each suite's own; swap: SmolLM2's window lengths)",
    )
    p.add_argument("--quick", action="store_true", help="the quick settings (10 minutes or less on 2 cores)")
    p.add_argument("--db", default=str(DEFAULT_DB), help=f"results database (default: {DEFAULT_DB})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default: {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, help="torch threads, pinned and recorded (default: min(CPUs, 2))")
    p.add_argument("--no-peers", action="store_true", help="leave out the peer-library baselines")
    p.add_argument("--no-report", action="store_true", help="only fill the database")
    p.set_defaults(run=cmd_arena)
    p = sub.add_parser("report", help="write the Markdown/HTML/PNG report of an arena database")
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("compare", help="compare two arena databases; exit 1 on a regression")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--fail-if-slower", type=float, metavar="PCT", help="a time (relative to SDPA) PCT%% slower fails")
    p.set_defaults(run=cmd_compare)


def run_command(args: argparse.Namespace) -> int:
    """Run an arena command, turning refused requests into exit code 2 with the message."""
    try:
        return args.run(args)
    except (ArenaError, StoreError) as error:
        print(f"attnzoo {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnzoo {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
