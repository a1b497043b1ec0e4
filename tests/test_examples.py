"""The examples run: the quick start, and the worked example of docs/adding_a_method.md."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "equals SDPA bitwise: True" in out


def test_adding_a_method_example_passes_the_generated_suite(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import custom_method
    finally:
        sys.path.remove(str(EXAMPLES))
    assert custom_method.main() == 0
    assert " 0 failed" in capsys.readouterr().out


def test_local_attention_example_trains():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import local_attention
    finally:
        sys.path.remove(str(EXAMPLES))
    for first, last in local_attention.main().values():
        assert last < 0.9 * first


def test_block_sparse_example_trains():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import block_sparse
    finally:
        sys.path.remove(str(EXAMPLES))
    for first, last in block_sparse.main().values():
        assert last < 0.9 * first
