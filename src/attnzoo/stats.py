"""Statistics a method reports about a call (the density a content-selected method used, ...).

Methods call :func:`record` unconditionally; it costs nothing unless a :func:`collect_stats`
block is active, whose list then receives one dict per call::

    with attnzoo.collect_stats() as stats:
        attnzoo.attention(q, k, v, method="moba", top_k=4)
    stats[0]["density"]  # fraction of the score matrix computed
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ACTIVE: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def collect_stats() -> Iterator[list[dict[str, Any]]]:
    """Collect the statistics of every attention call in the block (one dict per call, with at
    least ``method``; block-sparse methods add ``density``, content-selected ones ``selected_blocks``)."""
    found: list[dict[str, Any]] = []
    _ACTIVE.append(found)
    try:
        yield found
    finally:
        _ACTIVE.remove(found)


def active() -> bool:
    """Whether some :func:`collect_stats` block is listening (skip costly statistics otherwise)."""
    return bool(_ACTIVE)


def record(method: str, **values: Any) -> None:
    """Report ``values`` for one call of ``method`` to every active collector."""
    for found in _ACTIVE:
        found.append({"method": method, **values})
