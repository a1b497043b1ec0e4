"""Modules that own projections and call :func:`attnzoo.attention`."""

from .multihead import MultiheadAttention

__all__ = ["MultiheadAttention"]
