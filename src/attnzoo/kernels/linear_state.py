"""The state the linear / gated-recurrent family carries between calls and decode steps: its
tensors, their dtype, and the checks of an ``initial_state`` against a call."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearState:
    """The recurrent state of a linear-attention method, per batch element and key/value head.

    ``state [B, Hkv, Dk, Dv]``, ``normalizer [B, Hkv, Dk]`` (methods that normalise) and
    ``length``, the number of tokens absorbed (position-dependent feature maps continue from
    it). Tensors are float32, or float64 for float64 inputs. Pass one as ``initial_state`` to
    continue a sequence; ``return_state=True`` returns one.
    """

    state: Tensor
    normalizer: Tensor | None = None
    length: int = 0

    def size_bytes(self) -> int:
        tensors = [self.state] if self.normalizer is None else [self.state, self.normalizer]
        return sum(t.numel() * t.element_size() for t in tensors)

    def detach(self) -> LinearState:
        normalizer = None if self.normalizer is None else self.normalizer.detach()
        return replace(self, state=self.state.detach(), normalizer=normalizer)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulators: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_state(
    batch: int, heads: int, key_dim: int, value_dim: int, normalize: bool, dtype: torch.dtype, device: torch.device
) -> LinearState:
    ct = compute_dtype(dtype)
    state = torch.zeros(batch, heads, key_dim, value_dim, dtype=ct, device=device)
    normalizer = torch.zeros(batch, heads, key_dim, dtype=ct, device=device) if normalize else None
    return LinearState(state, normalizer, 0)


def check_state(
    state: object, batch: int, heads: int, key_dim: int, value_dim: int, normalize: bool, dtype: torch.dtype
) -> LinearState:
    """Validate an ``initial_state`` against the call; raises ``ValueError``/``TypeError`` naming it."""
    if not isinstance(state, LinearState):
        raise TypeError(f"initial_state must be an attnzoo LinearState (from return_state=True), got {type(state)}")
    ct = compute_dtype(dtype)
    expected = [batch, heads, key_dim, value_dim]
    if list(state.state.shape) != expected:
        raise ValueError(
            f"initial_state.state must have shape [B, Hkv, Dk, Dv] = {expected}, got {list(state.state.shape)}"
        )
    if state.state.dtype != ct:
        raise ValueError(f"initial_state.state must be {ct} for {dtype} inputs, got {state.state.dtype}")
    if normalize != (state.normalizer is not None):
        need = "a normalizer [B, Hkv, Dk]" if normalize else "no normalizer (this method does not normalise)"
        raise ValueError(f"initial_state must have {need}")
    z = state.normalizer
    if z is not None and (list(z.shape) != expected[:3] or z.dtype != ct):
        raise ValueError(
            f"initial_state.normalizer must be {ct} of shape [B, Hkv, Dk] = {expected[:3]}, "
            f"got {z.dtype} {list(z.shape)}"
        )
    if isinstance(state.length, bool) or not isinstance(state.length, int) or state.length < 0:
        raise ValueError(f"initial_state.length must be an int >= 0, got {state.length!r}")
    return state
