"""Converters from other libraries' window conventions to ``sliding_window``'s.

The libraries disagree by one key on what a "window of W" means. attnzoo's ``sliding_window``
uses flash-attn's inclusive ``window=(left, right)`` with bottom-right alignment: query ``i``
sees key ``j`` iff ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``. Each converter returns
the keyword arguments of :func:`attnzoo.attention` that reproduce the other library's mask
exactly (``tests/test_local.py`` checks each against the library's definition)::

    kwargs = attnzoo.conventions.from_attention_gym(window_size=256)
    # {'method': 'sliding_window', 'window': (256, 0), 'is_causal': True}: 257 keys per query
    out = attnzoo.attention(q, k, v, **kwargs)
"""

from __future__ import annotations

from typing import Any


def _window_kwargs(left: int | None, right: int | None, causal: bool) -> dict[str, Any]:
    return {"method": "sliding_window", "window": (left, right), "is_causal": causal}


def _non_negative(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def from_flash_attn(window_size: tuple[int, int] = (-1, -1), causal: bool = False) -> dict[str, Any]:
    """flash-attn ``flash_attn_func(..., causal, window_size=(left, right))``; ``-1`` is unbounded.
    Same convention (inclusive, bottom-right aligned), so only ``-1`` becomes ``None``."""
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    sides = []
    for name, value in zip(("window_size[0]", "window_size[1]"), window_size):
        if value == -1:
            sides.append(None)
        else:
            _non_negative(name, value)
            sides.append(value)
    return _window_kwargs(sides[0], 0 if causal else sides[1], causal)


def from_xformers_local(window_left: int, window_right: int) -> dict[str, Any]:
    """xformers ``LocalAttentionFromBottomRightMask(window_left, window_right)``: keys with
    ``q - window_left <= k + (Lq - Lk) <= q + window_right``: the same band, non-causal."""
    _non_negative("window_left", window_left)
    _non_negative("window_right", window_right)
    return _window_kwargs(window_left, window_right, False)


def from_xformers_causal_local(window_size: int) -> dict[str, Any]:
    """xformers ``LowerTriangularFromBottomRightLocalAttentionMask(window_size)`` and
    ``BlockDiagonalCausalLocalAttentionMask``: ``i - window_size < j <= i``, ``window_size`` keys."""
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
    return _window_kwargs(window_size - 1, 0, True)


def from_attention_gym(window_size: int) -> dict[str, Any]:
    """attention-gym ``generate_sliding_window(window_size)`` and the FlexAttention blog's
    ``SLIDING_WINDOW``: ``0 <= i - j <= window_size``, i.e. ``window_size + 1`` keys."""
    _non_negative("window_size", window_size)
    return _window_kwargs(window_size, 0, True)


def from_local_attention(window_size: int, causal: bool = True, exact_windowsize: bool = True) -> dict[str, Any]:
    """lucidrains ``LocalAttention(window_size=W, causal=True, look_backward=1, exact_windowsize=True)``:
    ``0 <= i - j <= W`` (W + 1 keys). Its default ``exact_windowsize=False`` attends whole blocks
    (own block plus the previous one: 1 to 2W keys depending on position), which is not a band;
    that form has no ``sliding_window`` equivalent and is refused."""
    _non_negative("window_size", window_size)
    if not exact_windowsize:
        raise ValueError(
            "exact_windowsize=False: local-attention then attends whole blocks (1..2W keys by position), "
            "not a sliding window; pass exact_windowsize=True for the band 0 <= i - j <= W"
        )
    if not causal:
        raise ValueError("causal=False: only local-attention's causal exact window is converted (0 <= i - j <= W)")
    return _window_kwargs(window_size, 0, True)


__all__ = [
    "from_attention_gym",
    "from_flash_attn",
    "from_local_attention",
    "from_xformers_causal_local",
    "from_xformers_local",
]
