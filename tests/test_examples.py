"""The examples run: the quick start, and the worked example of docs/adding_a_method.md."""

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", ["local_attention", "block_sparse", "linear_attention"])
def test_training_examples_train(name):
    # Loaded from its path under a private name: "local_attention" is also a peer library's module.
    spec = importlib.util.spec_from_file_location(f"attnzoo_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for first, last in module.main().values():
        assert last < 0.9 * first


def test_transformers_swap_example(capsys):
    pytest.importorskip("transformers")
    from attnzoo.integrations import assets

    if assets.minilm_unavailable():
        pytest.skip(assets.minilm_unavailable())
    spec = importlib.util.spec_from_file_location("attnzoo_example_swap", EXAMPLES / "transformers_swap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cosines = module.main([])
    assert bool(((cosines["attnzoo_dense"] - 1).abs() < 1e-6).all())
    assert bool((cosines["attnzoo_window"] < 0.9999).all())
    assert "fallbacks: {}" in capsys.readouterr().out
