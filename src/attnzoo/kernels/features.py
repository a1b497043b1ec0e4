"""Feature maps of kernelised (linear) attention: ``phi`` applied to queries and keys so that
``phi(q) . phi(k)`` stands in for the softmax kernel ``exp(q . k)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_MAPS = ("elu", "relu", "identity", "softmax")
NONNEGATIVE = ("elu", "relu", "softmax")


def feature_map(name: str, x: Tensor) -> Tensor:
    """``elu``: ``elu(x) + 1`` (Katharopoulos et al., 2020); ``relu``; ``identity``;
    ``softmax``: softmax over the feature dimension (Shen et al., 2021). Dtype-preserving."""
    if name == "elu":
        return F.elu(x).add_(1.0)  # in place: elu's backward reads its input, not its output
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def check_normalizable(feature_map_name: str, normalize: bool) -> None:
    """``normalize=True`` needs a non-negative feature map (else the denominator can be 0 or negative)."""
    if normalize and feature_map_name not in NONNEGATIVE:
        raise ValueError(
            f"normalize=True needs a non-negative feature_map {NONNEGATIVE}: {feature_map_name!r} features can "
            "make the denominator 0 or negative; pass normalize=False"
        )
