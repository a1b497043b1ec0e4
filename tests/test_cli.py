"""The ``attnzoo`` command."""

import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo import cli
from attnzoo.docs import render_methods

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_and_info(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "dense" in out and "sdpa,tiled" in out
    code, out, _ = run(capsys, "info", "dense")
    assert code == 0 and "arxiv.org" in out and "tiled" in out and "capabilities" in out


def test_check_passes_and_prints_a_table(capsys):
    code, out, _ = run(capsys, "check", "dense")
    assert code == 0
    assert "gold" in out and "bad_input" in out and " 0 failed" in out


def test_check_exits_1_on_failure(capsys, monkeypatch):
    from attnzoo.testing import conformance

    original, cases = conformance.check_case, conformance.conformance_cases

    def failing(case, seed=0):
        result = original(case, seed)
        result.passed, result.message = False, "planted failure"
        return result

    monkeypatch.setattr(conformance, "check_case", failing)
    monkeypatch.setattr(conformance, "conformance_cases", lambda *a, **kw: cases(*a, **kw)[:2])
    code, out, _ = run(capsys, "check", "dense")
    assert code == 1 and "FAIL gold" in out and "planted failure" in out


def test_explain(capsys):
    code, out, _ = run(capsys, "explain", "dense", "--shape", "1,8,128,64", "--causal", "--lse")
    assert code == 0 and "sdpa: runs" in out
    code, out, _ = run(
        capsys, "explain", "dense", "--shape", "1,8,16,32", "--kv-shape", "1,8,20,32", "--value-dim", "24", "--lse"
    )
    assert code == 0 and "tiled: runs" in out and "value head size" in out


@pytest.mark.parametrize(
    "argv",
    [["info", "no_such_method"], ["explain", "dense", "--shape", "1,8,16,64", "--param", "bogus=3"]],
)
def test_errors_exit_2_with_a_message(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.strip()


def test_bad_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "dense", "--shape", "1,8,x"])
    assert info.value.code == 2


def test_committed_methods_doc_is_current():
    committed = (ROOT / "docs" / "methods.md").read_text()
    assert committed == render_methods(), "docs/methods.md is stale: run `attnzoo docs`"


def test_docs_check_flag(tmp_path, capsys):
    target = tmp_path / "methods.md"
    assert run(capsys, "docs", "--out", str(target), "--check")[0] == 1
    assert run(capsys, "docs", "--out", str(target))[0] == 0
    assert run(capsys, "docs", "--out", str(target), "--check")[0] == 0


def test_console_entry_points_run():
    for argv in ([sys.executable, "-m", "attnzoo", "--help"], [sys.executable, "-m", "attnzoo", "list"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
