"""Every invalid call raises a clear error naming the argument, before any backend runs."""

import pytest

import attnzoo
import attnzoo.api
from attnzoo.testing.bad_inputs import bad_inputs

TABLE = [(spec.name, entry) for spec in attnzoo.methods() for entry in bad_inputs(spec)]


def test_table_is_large_enough():
    for spec in attnzoo.methods():
        assert len(bad_inputs(spec)) >= 20


@pytest.mark.parametrize("method,entry", TABLE, ids=[f"{m}-{e.name}" for m, e in TABLE])
def test_bad_input_is_refused_before_computation(method, entry, monkeypatch):
    ran = []
    monkeypatch.setattr(attnzoo.api, "_execute", lambda *a: ran.append(a))
    args, kwargs = entry.build()
    with pytest.raises(entry.error) as info:
        attnzoo.attention(*args, **kwargs)
    assert entry.argument in str(info.value), str(info.value)
    assert not ran, "a backend ran before the error"


@pytest.mark.parametrize("method,entry", TABLE[:5], ids=[f"{m}-{e.name}" for m, e in TABLE[:5]])
def test_explain_refuses_the_same_inputs(method, entry):
    args, kwargs = entry.build()
    kwargs.pop("backend", None)
    with pytest.raises(entry.error):
        attnzoo.explain(*args, **kwargs)
