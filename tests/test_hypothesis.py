"""Random valid and invalid calls for every registered method: a finite output of the right
shape, or a ValueError/TypeError; never another exception, never NaN."""

import dataclasses
import types
import typing

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo.errors import NoBackendError

JUNK = st.sampled_from([None, "x", -1, 0, 1.5, float("nan"), (), (1, 2, 3), object()])


def _strategy(annotation):
    """A strategy drawing mostly valid values for a parameter's annotation, sometimes junk."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        valid = st.one_of(*[_strategy(a) for a in typing.get_args(annotation)])
    elif origin is typing.Literal:
        valid = st.sampled_from(typing.get_args(annotation))
    elif origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            valid = st.lists(_strategy(args[0]), min_size=1, max_size=3).map(tuple)
        else:
            valid = st.tuples(*[_strategy(a) for a in args])
    elif annotation is bool:
        valid = st.booleans()
    elif annotation is int:
        valid = st.integers(-2, 70)
    elif annotation is float:
        valid = st.floats(-2.0, 5.0, allow_nan=False)
    elif annotation is type(None):
        valid = st.none()
    else:
        valid = JUNK
    return st.one_of(valid, valid, valid, JUNK)


def _rarely(draw, one_in):
    """True about once in ``one_in`` draws (hypothesis favours first elements and small integers)."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


def _size(draw, high):
    """A size, occasionally 0 (invalid)."""
    return 0 if _rarely(draw, 16) else draw(st.integers(1, high))


@st.composite
def calls(draw, spec):
    spatial = spec.capabilities.spatial_dims
    n_spatial = draw(st.sampled_from(spatial)) if spatial else 1
    batch = _size(draw, 3)
    kv_heads = _size(draw, 3)
    q_heads = _size(draw, 4) if _rarely(draw, 6) else kv_heads * draw(st.integers(1, 3))
    q_extent = [_size(draw, 40) for _ in range(n_spatial)]
    kv_extent = q_extent if draw(st.booleans()) else [_size(draw, 40) for _ in range(n_spatial)]
    dim = _size(draw, 9)
    value_dim = dim if draw(st.booleans()) else _size(draw, 9)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    dtype = torch.int64 if _rarely(draw, 10) else draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(batch, q_heads, *q_extent, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, *kv_extent, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, *kv_extent, value_dim, generator=gen).to(dtype)
    if _rarely(draw, 10):
        q = q.flatten(0, 1) if q.dim() > 3 and draw(st.booleans()) else q[None]  # a wrong rank
    kwargs = {"method": spec.name, "is_causal": draw(st.booleans())}
    n_keys = int(torch.tensor(kv_extent).prod())
    if _rarely(draw, 3):
        kwargs["kv_mask"] = torch.rand(batch, n_keys + (1 if _rarely(draw, 6) else 0), generator=gen) < 0.6
    if _rarely(draw, 4):
        n_queries = int(torch.tensor(q_extent).prod())
        kwargs["attn_mask"] = torch.rand(1, n_queries, n_keys + (2 if _rarely(draw, 6) else 0), generator=gen) < 0.7
    if _rarely(draw, 4):
        # Valid scales are drawn with |scale| <= 1e3: beyond that scores can overflow the dtype and
        # the output is NaN exactly as with SDPA (a range limit, documented in docs/design.md).
        # Non-finite and non-number scales must be refused.
        invalid = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.text(max_size=2))
        kwargs["scale"] = draw(st.one_of(st.floats(-1e3, 1e3), st.none(), invalid))
    if _rarely(draw, 5):
        kwargs["dropout_p"] = draw(st.floats(-0.5, 1.5))
    if _rarely(draw, 3):
        kwargs["return_lse"] = draw(st.booleans())
    hints = typing.get_type_hints(spec.params)
    for f in dataclasses.fields(spec.params):
        if draw(st.booleans()):
            kwargs[f.name] = draw(_strategy(hints[f.name]))
    if _rarely(draw, 10):
        kwargs["unknown_parameter"] = 1
    return (q, k, v), kwargs


@given(data=st.data())
def test_random_calls_give_finite_output_or_a_clear_error(data):
    spec = data.draw(st.sampled_from(attnzoo.methods()))
    (q, k, v), kwargs = data.draw(calls(spec))
    try:
        result = attnzoo.attention(q, k, v, **kwargs)
    except NoBackendError:
        return
    except (ValueError, TypeError) as error:
        assert str(error), "an error must say what is wrong"
        return
    out = result[0] if isinstance(result, tuple) else result
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all()
