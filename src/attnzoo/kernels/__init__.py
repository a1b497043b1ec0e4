"""Shared primitives used by many methods: masks, the softmax reference, LSE merge, tiled attention."""

from .lse import merge_attention_states
from .masks import dense_bias, dense_visibility
from .reference import softmax_reference

__all__ = ["dense_bias", "dense_visibility", "merge_attention_states", "softmax_reference"]
