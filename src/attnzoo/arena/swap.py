"""The swap suite: training-free replacement of attention inside real pretrained models.

Each method is registered with transformers (:func:`attnzoo.integrations.transformers.register`)
at a budget (the fraction of the allowed (query, key) pairs each call may attend; per call the
parameters come from ``Method.budget`` at :func:`.probe.budget_keys`, as in the fidelity suite),
switched in with ``model.set_attn_implementation`` for one cell, and switched back to ``sdpa``.

* **MiniLM** (all-MiniLM-L6-v2, bidirectional): every method with a budget that runs non-causally,
  and ``dense``. Over :func:`.corpus.retrieval_corpus` (queries and documents, at most
  ``max_tokens`` tokens each; texts of equal token count run batched, so no padding is ever
  involved and each text is attended as if alone): the mean **cosine** between each
  text's embedding and the dense model's (SDPA) embedding, and **retrieval**: every query ranks
  every document by cosine; top-1 accuracy and mean reciprocal rank, with the dense model's and
  chance's beside them.
* **SmolLM2-135M** (Llama decoder, causal, GQA): every causal method with a budget, and ``dense``.
  One window of the first ``N`` tokens of :func:`.corpus.lm_text`, batch 1, teacher-forced,
  ``use_cache=False``: the **perplexity** of the next token over the ``N - 1`` predicted positions,
  its ratio to SDPA's on the same window, and the **top-1 agreement with dense** (teacher-forced
  greedy): the fraction of those positions where the method's argmax next token is SDPA's.

The **density** reported is the share of the allowed pairs a method computed, read from what it
records under :func:`attnzoo.collect_stats` (weighted by each call's allowed pairs), else the
nominal budget (``density_source`` says which). Calls the integration served with SDPA instead of
the method (:func:`~attnzoo.integrations.transformers.fallbacks`) mark the cell ``fallback``: its
numbers are then partly SDPA's and are never counted as the method's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NoBackendError
from ..registry import Method, get_method
from ..stats import collect_stats
from . import corpus
from .common import allowed_pairs_count
from .store import Cell

SUITE = "swap"
MINILM = "minilm"
SMOLLM2 = "smollm2"
MODELS = (MINILM, SMOLLM2)
SMOLLM2_MAX_TOKENS = 8192
# Sizes used for the memory estimate: parameters (float32) and the vocabulary of the logits.
_MODEL_BYTES = {MINILM: 23_000_000 * 4, SMOLLM2: 135_000_000 * 4}
_SMOLLM2_VOCAB = 49_152
_SMOLLM2_HEADS = 9


@dataclass(frozen=True)
class SwapConfig:
    """Budgets, SmolLM2 window lengths, the MiniLM corpus size (None: every item) and the token cap
    of each MiniLM text."""

    budgets: tuple[float, ...] = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
    lm_sizes: tuple[int, ...] = (512, 1024, 2048)
    retrieval_items: int | None = None
    max_tokens: int = 256


QUICK = SwapConfig(budgets=(1 / 4,), lm_sizes=(512,), retrieval_items=16)


def minilm_methods(methods: list[Method]) -> list[Method]:
    """``dense`` and the methods with a budget that run non-causally, in the given order."""
    return [m for m in methods if m.name == "dense" or (m.budget is not None and m.capabilities.noncausal)]


def smollm2_methods(methods: list[Method]) -> list[Method]:
    """``dense`` and the methods with a budget that run causally, in the given order."""
    return [m for m in methods if m.name == "dense" or (m.budget is not None and m.capabilities.causal)]


def plan(methods: list[Method], config: SwapConfig, threads: int, sizes: tuple[int, ...] | None = None) -> list[Cell]:
    """Every cell: SmolLM2 x N x method x budget (``sizes``, when given, replace
    ``config.lm_sizes``; shortest first, the perplexity comparison being the suite's headline),
    then MiniLM x method x budget. ``dense`` runs once per model and N, with budget None."""
    cells = []
    for n in sorted(sizes or config.lm_sizes):
        shape = {"model": SMOLLM2, "text": corpus.source(), "B": 1, "N": n, "causal": True}
        for spec in smollm2_methods(methods):
            for budget in (None,) if spec.name == "dense" else config.budgets:
                cells.append(Cell(SUITE, spec.name, "default", {"budget": budget}, dict(shape), threads=threads))
    items = len(corpus.retrieval_corpus(config.retrieval_items))
    minilm_shape = {
        "model": MINILM,
        "corpus": corpus.source(),
        "items": items,
        "max_tokens": config.max_tokens,
        "causal": False,
    }
    for spec in minilm_methods(methods):
        for budget in (None,) if spec.name == "dense" else config.budgets:
            cells.append(Cell(SUITE, spec.name, "default", {"budget": budget}, dict(minilm_shape), threads=threads))
    return cells


def estimate_bytes(cell: Cell) -> int:
    """The model, the logits (SmolLM2: a few float32 copies of ``N x vocab``) and one head-batch of
    score matrices, with slack."""
    s = cell.shape
    if s["model"] == SMOLLM2:
        n = s["N"]
        return _MODEL_BYTES[SMOLLM2] * 2 + n * _SMOLLM2_VOCAB * 4 * 4 + _SMOLLM2_HEADS * n * n * 4 * 4
    return _MODEL_BYTES[MINILM] * 2 + 12 * s["max_tokens"] ** 2 * 4 * 8


def unavailable(cell: Cell) -> str | None:
    """Why the cell's model cannot be loaded here (with the pip command), else None."""
    from ..integrations import assets

    return assets.minilm_unavailable() if cell.shape["model"] == MINILM else assets.smollm2_unavailable()


# ----------------------------------------------------------------------------- shared pieces
@contextlib.contextmanager
def swapped(model: Any, spec: Method, budget: float | None) -> Iterator[str]:
    """``model`` running ``spec`` at ``budget`` inside the block (SDPA again after it, even on an
    error); yields the registered name. Registering again resets the name's fallback counts."""
    from ..integrations.transformers import register

    name = register(f"attnzoo_swap_{spec.name}", spec.name, budget=budget)
    model.set_attn_implementation(name)
    try:
        yield name
    finally:
        model.set_attn_implementation("sdpa")


class _Density:
    """Accumulates the computed share of the allowed pairs over forwards: each call's recorded
    ``density`` (a share of its full ``Nq x Nk`` score matrix) times ``Nq * Nk``, over the allowed
    pairs of the calls that recorded one."""

    def __init__(self) -> None:
        self.computed = self.allowed = 0.0
        self.recorded = 0

    def add(self, stats: list[dict[str, Any]], n: int, causal: bool, copies: int = 1) -> None:
        """The records of forwards over ``copies`` sequences of ``n`` tokens each (a record's
        density is its mean over the batch)."""
        for record in stats:
            density = record.get("density")
            if isinstance(density, (int, float)) and not isinstance(density, bool) and math.isfinite(density):
                self.computed += density * n * n * copies
                self.allowed += allowed_pairs_count(n, n, causal) * copies
                self.recorded += 1

    def values(self, budget: float | None) -> dict[str, Any]:
        if self.recorded:
            return {"density": self.computed / self.allowed, "density_source": "measured"}
        return {"density": budget if budget is not None else 1.0, "density_source": "nominal"}


def _fallback_values(name: str, calls: int) -> dict[str, Any]:
    from ..integrations.transformers import fallbacks

    found = fallbacks(name)
    served = sum(found.values())
    values: dict[str, Any] = {"calls": calls, "fallbacks": found, "fallback_calls": served}
    if served:
        reasons = "; ".join(f"{count}x {reason}" for reason, count in sorted(found.items()))
        values["status"] = "fallback"
        values["message"] = f"{served} of {calls} attention calls were served by SDPA, not the method: {reasons}"
    return values


# ----------------------------------------------------------------------------- MiniLM
def _texts(items: int | None) -> tuple[list[str], int]:
    """Queries then documents of the retrieval corpus, and the number of items."""
    found = corpus.retrieval_corpus(items)
    return [x.query for x in found] + [x.document for x in found], len(found)


def _token_ids(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]


@functools.lru_cache(maxsize=2)
def _minilm_reference(items: int | None, max_tokens: int) -> torch.Tensor:
    """SDPA's embeddings of the corpus texts `[2 * items, 384]`."""
    from ..integrations import assets

    tokenizer, model = assets.minilm()
    texts, _ = _texts(items)
    model.set_attn_implementation("sdpa")
    return _embed(model, _token_ids(tokenizer, texts, max_tokens))[0]


def _embed(
    model: Any, ids: list[list[int]], density: _Density | None = None, batch: int = 32
) -> tuple[torch.Tensor, int]:
    """Sentence embeddings `[len(ids), 384]` as sentence-transformers computes them (mean of the last
    hidden states, L2-normalised), and the number of forwards run. Texts of the same token count run
    together (up to ``batch`` at a time), so no padding is ever involved: each text is attended
    exactly as if alone, in far fewer forwards than one per text."""
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(index)
    out = torch.empty(len(ids), model.config.hidden_size)
    forwards = 0
    for n, members in sorted(by_length.items()):
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            input_ids = torch.tensor([ids[i] for i in chunk])
            with torch.no_grad(), collect_stats() as stats:
                hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
            out[chunk] = torch.nn.functional.normalize(hidden.mean(1), dim=1)
            forwards += 1
            if density is not None:
                density.add(stats, n, causal=False, copies=len(chunk))
    return out, forwards


def retrieval(queries: torch.Tensor, documents: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and mean reciprocal rank of query ``i`` retrieving document ``i`` by cosine.

    Args:
        queries: `[n, E]` L2-normalised embeddings.
        documents: `[n, E]` L2-normalised embeddings, document ``i`` labelled with query ``i``.

    A document scoring exactly as high as the right one counts against it (ties are losses).
    """
    if queries.dim() != 2 or queries.shape != documents.shape:
        raise ValueError(
            f"queries and documents must both be [n, E], got {list(queries.shape)} and {list(documents.shape)}"
        )
    scores = queries.double() @ documents.double().T
    right = scores.diagonal()[:, None]
    rank = (scores >= right).sum(1) - 1  # the right document itself is the one equal entry
    return float((rank == 0).double().mean()), float((1.0 / (rank + 1).double()).mean())


def _measure_minilm(cell: Cell, spec: Method, budget: float | None) -> dict[str, Any]:
    from ..integrations import assets

    tokenizer, model = assets.minilm()
    items, max_tokens = cell.shape["items"], cell.shape["max_tokens"]
    reference = _minilm_reference(items, max_tokens)
    texts, count = _texts(items)
    if count != items:
        raise ValueError(f"the corpus has {count} items here, the cell was planned with {items}")
    ids = _token_ids(tokenizer, texts, max_tokens)
    density = _Density()
    start = time.perf_counter()
    with swapped(model, spec, budget) as name:
        embeddings, forwards = _embed(model, ids, density)
    seconds = time.perf_counter() - start
    cosines = (embeddings.double() * reference.double()).sum(-1)
    finite = bool(torch.isfinite(embeddings).all())
    accuracy, mrr = retrieval(embeddings[:count], embeddings[count:]) if finite else (None, None)
    dense_accuracy, dense_mrr = retrieval(reference[:count], reference[count:])
    return {
        "status": "ok" if finite else "error",
        **({} if finite else {"message": "non-finite embeddings"}),
        "cosine": float(cosines.mean()) if finite else None,
        "cosine_min": float(cosines.min()) if finite else None,
        "accuracy": accuracy,
        "mrr": mrr,
        "dense_accuracy": dense_accuracy,
        "dense_mrr": dense_mrr,
        "chance": 1.0 / count,
        "seconds": seconds,
        **density.values(budget),
        "forwards": forwards,
        **_fallback_values(name, forwards * model.config.num_hidden_layers),
    }


# ----------------------------------------------------------------------------- SmolLM2
@functools.lru_cache(maxsize=1)
def _lm_tokens() -> torch.Tensor:
    """The first :data:`SMOLLM2_MAX_TOKENS` tokens of :func:`.corpus.lm_text` `[1, T]`."""
    from ..integrations import assets

    tokenizer, _ = assets.smollm2()
    # Help-topic text runs about 4 characters per token; 6 per token leaves a margin.
    ids = tokenizer(corpus.lm_text(6 * SMOLLM2_MAX_TOKENS), return_tensors="pt")["input_ids"]
    return ids[:, :SMOLLM2_MAX_TOKENS]


def _nll_and_argmax(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood (float64) of tokens 1..N-1 given their prefixes, and the argmax
    `[N - 1]` at the positions predicting them."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="mean")
    return float(nll), logits.argmax(-1)


@functools.lru_cache(maxsize=1)
def _smollm2_reference(n: int) -> tuple[float, torch.Tensor]:
    """SDPA's mean NLL and argmax on the first ``n`` tokens (one window kept at a time)."""
    from ..integrations import assets

    _, model = assets.smollm2()
    model.set_attn_implementation("sdpa")
    return _nll_and_argmax(model, _lm_tokens()[:, :n])


def _measure_smollm2(cell: Cell, spec: Method, budget: float | None) -> dict[str, Any]:
    from ..integrations import assets

    n = cell.shape["N"]
    if n > SMOLLM2_MAX_TOKENS:
        raise _Unsupported(f"N={n}: SmolLM2 takes at most {SMOLLM2_MAX_TOKENS} tokens")
    _, model = assets.smollm2()
    ids = _lm_tokens()[:, :n]
    if ids.shape[1] < n:
        raise _Unsupported(f"N={n}: the text holds only {ids.shape[1]} tokens")
    dense_nll, dense_argmax = _smollm2_reference(n)
    density = _Density()
    start = time.perf_counter()
    with swapped(model, spec, budget) as name, collect_stats() as stats:
        nll, argmax = _nll_and_argmax(model, ids)
    seconds = time.perf_counter() - start
    density.add(stats, n, causal=True)
    finite = math.isfinite(nll)
    return {
        "status": "ok" if finite else "error",
        **({} if finite else {"message": "non-finite perplexity"}),
        "perplexity": math.exp(nll) if finite else None,
        "dense_perplexity": math.exp(dense_nll),
        "ratio": math.exp(nll - dense_nll) if finite else None,
        "agreement": float((argmax == dense_argmax).double().mean()),
        "positions": n - 1,
        "seconds": seconds,
        **density.values(budget),
        **_fallback_values(name, model.config.num_hidden_layers),
    }


class _Unsupported(Exception):
    """A cell the model cannot run (too long a window)."""


def measure(cell: Cell, config: SwapConfig | None = None) -> dict[str, Any]:
    """Measure one swap cell; a method that cannot run is stored as ``unsupported`` or ``error``
    with the message. ``config`` is accepted for the runner's signature (the cell holds its shape)."""
    spec = get_method(cell.method)
    budget = cell.params.get("budget")
    base = {"family": spec.family, "budget": budget, "model": cell.shape["model"]}
    try:
        run = _measure_minilm if cell.shape["model"] == MINILM else _measure_smollm2
        return {**base, **run(cell, spec, budget)}
    except (NoBackendError, _Unsupported) as error:
        return {**base, "status": "unsupported", "message": str(error)[:2000]}
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError) as error:
        return {**base, "status": "error", "message": f"{type(error).__name__}: {error}"[:2000]}
