"""The registry, parameter dataclasses and the public namespace."""

import dataclasses
from typing import Literal

import pytest

import attnzoo
from attnzoo.methods.dense import DENSE
from attnzoo.params import MethodParams, param, parse_value
from attnzoo.registry import Backend, registered


def test_public_namespace():
    assert set(attnzoo.__all__) == {
        "AttentionCall", "AttentionOutput", "Backend", "BlockLayout", "Capabilities", "DecodeState", "Explanation",
        "Method", "NoBackendError", "Paper", "__version__", "attention", "collect_stats", "explain", "get_method",
        "init_state", "merge_attention_states", "methods", "nn", "register", "step", "conventions", "Cache",
        "state_size",
    }  # fmt: skip
    for name in attnzoo.__all__:
        assert hasattr(attnzoo, name)


def test_every_method_is_complete():
    for spec in attnzoo.methods():
        assert spec.summary and spec.paper.url.startswith("https://")
        assert spec.backends, f"{spec.name} has no fast path"
        assert spec.reference.__doc__, f"{spec.name}'s reference has no docstring"
        spec.params()  # defaults are valid


def test_register_refuses_duplicates_and_bad_specs():
    before = [m.name for m in attnzoo.methods()]
    with pytest.raises(ValueError, match="already registered"):
        attnzoo.register(DENSE)
    with pytest.raises(ValueError, match="family"):
        attnzoo.register(dataclasses.replace(DENSE, name="x1", family="magic"))
    with pytest.raises(ValueError, match="unique"):
        backend = DENSE.backends[0]
        attnzoo.register(dataclasses.replace(DENSE, name="x2", backends=(backend, backend)))
    with pytest.raises(ValueError, match="decode"):
        attnzoo.register(dataclasses.replace(DENSE, name="x4", decoder=None))
    with pytest.raises(ValueError, match="reference"):
        attnzoo.register(dataclasses.replace(DENSE, name="x3", backends=(Backend("reference", backend.run),)))
    assert [m.name for m in attnzoo.methods()] == before  # nothing half-registered


def test_backend_with_missing_package_explains_itself():
    optional = Backend("optional", DENSE.backends[0].run, requires=("no_such_package_xyz",))
    with registered(dataclasses.replace(DENSE, name="needs_pkg", backends=(optional,))):
        import torch

        q = torch.randn(1, 1, 4, 4)
        explanation = attnzoo.explain(q, q, q, method="needs_pkg")
        assert explanation.chosen is None and "no_such_package_xyz" in str(explanation)
        with pytest.raises(attnzoo.NoBackendError, match="no_such_package_xyz"):
            attnzoo.attention(q, q, q, method="needs_pkg")


@dataclasses.dataclass(frozen=True)
class ExampleParams(MethodParams):
    window: tuple[int | None, int | None] = param((4, 0), "keys to the left and right")
    top_k: int = param(8, "keys kept")
    feature_map: Literal["elu", "relu"] = param("elu", "feature map")
    tau: float | None = param(None, "mass threshold")

    def validate(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def test_params_validate_types_ranges_and_names():
    assert ExampleParams(window=[3, None]).window == (3, None)  # lists become tuples
    assert ExampleParams(tau=1).tau == 1.0
    with pytest.raises(TypeError, match="window"):
        ExampleParams(window=(1.5, 0))
    with pytest.raises(TypeError, match="top_k"):
        ExampleParams(top_k=True)
    with pytest.raises(TypeError, match="feature_map"):
        ExampleParams(feature_map="tanh")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        ExampleParams(top_k=0)
    with pytest.raises(ValueError) as info:
        ExampleParams.from_kwargs("example", {"topk": 3})
    message = str(info.value)
    assert "'topk'" in message and "top_k: int = 8" in message and "window: tuple[int | None, int | None]" in message


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("(255, 0)") == (255, 0)
    assert parse_value("None") is None and parse_value("elu") == "elu"
