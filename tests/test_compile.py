"""attention() inside torch.compile: traced without graph breaks, same results and gradients.

The ``aot_eager`` backend traces exactly as inductor does but skips code generation, so this
runs in seconds on CPU.
"""

import warnings

import pytest
import torch
import torch._dynamo as dynamo

import attnzoo


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_compiles_without_graph_breaks(backend, return_lse):
    def loss(q, k, v):
        result = attnzoo.attention(q, k, v, is_causal=True, backend=backend, return_lse=return_lse)
        return result[0].sum() + result[1].sum() if return_lse else result.sum()

    q, k, v = (torch.randn(1, 4, 40, 16, requires_grad=True) for _ in range(3))
    dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dynamo.explain(loss)(q, k, v).graph_break_count == 0
        compiled = torch.compile(loss, backend="aot_eager")
        value = compiled(q, k, v)
        grads = torch.autograd.grad(value, (q, k, v))
    assert not [w for w in caught if "attnzoo" in str(w.filename) or "attnzoo" in str(w.message)]
    expected_value = loss(q, k, v)
    expected_grads = torch.autograd.grad(expected_value, (q, k, v))
    torch.testing.assert_close(value, expected_value)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
