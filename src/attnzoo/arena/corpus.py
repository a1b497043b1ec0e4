"""Offline text for the swap suite, built from data that ships with Python itself (no network).

* :func:`retrieval_corpus`: a labelled retrieval set. Each section of the interpreter's help topics
  (``pydoc_data.topics.topics``, the text ``help("if")`` prints) gives one item: the **query** is
  the first sentence of the section's prose, the **document** the rest of that prose; item ``i``'s
  query should retrieve document ``i``. Grammar and code blocks (indented paragraphs) are left
  out, so a query cannot be matched by copying a formula. Where ``pydoc_data`` is missing (some
  distributions strip it), the docstrings of :data:`attnzoo.arena.data.STDLIB_MODULES` stand in:
  query = the summary line, document = the rest.
* :func:`lm_text`: English text for perplexity: the help topics concatenated in sorted key order
  (each distinct text once), or :func:`attnzoo.arena.data.stdlib_text` where they are missing.

Everything is a pure function of the Python version: the same interpreter gives the same corpus.

Example:
    >>> items = retrieval_corpus(limit=8)
    >>> items[0].query, items[0].document  # ('Assert statements are ...', 'In the current ...')
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from . import data

PYDOC_SOURCE = "pydoc_data.topics"
STDLIB_SOURCE = "stdlib docstrings"
# A section heading in the topics: a title line underlined by a rule of one of these characters.
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=\-~^]{3,})[ \t]*$", re.M)
# A sentence ends at . ! ? or a colon, before whitespace and a capital, quote, '*' or '('.
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"“*(])")
MIN_QUERY_WORDS = 6
MIN_DOCUMENT_WORDS = 40


@dataclass(frozen=True)
class RetrievalItem:
    """One labelled pair: ``query`` should retrieve ``document``. ``topic`` is the help-topic key
    (or the module name), ``title`` the section title (or the object's qualified name)."""

    topic: str
    title: str
    query: str
    document: str


def _pydoc_topics() -> dict[str, str] | None:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return dict(topics) if isinstance(topics, dict) and topics else None


def source() -> str:
    """Where the text comes from here: :data:`PYDOC_SOURCE` or :data:`STDLIB_SOURCE`."""
    return PYDOC_SOURCE if _pydoc_topics() is not None else STDLIB_SOURCE


def _distinct_topics(topics: dict[str, str]) -> list[tuple[str, str]]:
    """``(key, text)`` in sorted key order, each text once (``else`` and ``if`` share one)."""
    seen: set[str] = set()
    found = []
    for key in sorted(topics):
        if topics[key] not in seen:
            seen.add(topics[key])
            found.append((key, topics[key]))
    return found


def sections(text: str) -> list[tuple[str, str]]:
    """``(title, body)`` of each headed section of a help topic, in order (a heading is a line
    underlined by at least as many ``*``, ``=``, ``-``, ``~`` or ``^`` as it has characters)."""
    marks = [m for m in _HEADING.finditer(text) if len(m.group("rule")) >= len(m.group("title").rstrip())]
    return [
        (mark.group("title").strip(), text[mark.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)])
        for i, mark in enumerate(marks)
    ]


def prose(body: str) -> list[str]:
    """The prose paragraphs of a section body, whitespace collapsed: paragraphs that start
    indented (grammar, code, examples, tables) are dropped."""
    paragraphs = re.split(r"\n[ \t]*\n", body.strip("\n"))
    return [" ".join(p.split()) for p in paragraphs if p.strip() and not p[:1].isspace()]


def _split_first_sentence(paragraphs: list[str]) -> tuple[str, str] | None:
    """(first sentence, the rest joined by spaces), or None when nothing follows the sentence."""
    if not paragraphs:
        return None
    head = _SENTENCE_END.split(paragraphs[0], maxsplit=1)
    rest = [*head[1:], *paragraphs[1:]]
    return (head[0], " ".join(rest)) if rest else None


def _keep(query: str, document: str) -> bool:
    return len(query.split()) >= MIN_QUERY_WORDS and len(document.split()) >= MIN_DOCUMENT_WORDS


def _pydoc_items(topics: dict[str, str]) -> list[RetrievalItem]:
    items = []
    for key, text in _distinct_topics(topics):
        for title, body in sections(text):
            split = _split_first_sentence(prose(body))
            if split is not None and _keep(*split):
                items.append(RetrievalItem(key, title, *split))
    return items


def _stdlib_items() -> list[RetrievalItem]:
    items = []
    for module in data.STDLIB_MODULES:
        for index, doc in enumerate(data._module_docs(module)):
            summary, _, rest = doc.strip().partition("\n")
            query, document = " ".join(summary.split()), " ".join(" ".join(prose(rest)).split())
            if _keep(query, document):
                items.append(RetrievalItem(module, f"{module} docstring {index}", query, document))
    return items


@functools.lru_cache(maxsize=1)
def _all_items() -> tuple[RetrievalItem, ...]:
    topics = _pydoc_topics()
    found = _pydoc_items(topics) if topics is not None else _stdlib_items()
    # A document that appears twice would make its queries ambiguous: keep its first item only.
    seen: set[str] = set()
    unique = []
    for item in found:
        if item.document not in seen:
            seen.add(item.document)
            unique.append(item)
    return tuple(unique)


def retrieval_corpus(limit: int | None = None) -> tuple[RetrievalItem, ...]:
    """The labelled retrieval items (156 from the help topics of CPython 3.11).

    Args:
        limit: at most this many items, taken evenly spread over the whole corpus (every
            ``len / limit``-th item, so a small corpus still spans many topics). Default: `None`
            (all).

    Returns:
        the items in a fixed order; item ``i``'s query is labelled with document ``i``.

    Raises:
        ValueError: ``limit`` is not a positive int.
    """
    items = _all_items()
    if limit is None or limit >= len(items):
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return tuple(items[i * len(items) // limit] for i in range(limit))


def lm_text(min_chars: int) -> str:
    """English text for perplexity: the distinct help topics in sorted key order joined by blank
    lines (about 460,000 characters in CPython 3.11), cut after the first topic that reaches
    ``min_chars``; :func:`attnzoo.arena.data.stdlib_text` where ``pydoc_data`` is missing.

    Raises:
        ValueError: ``min_chars`` is not a positive int, or more than the text holds.
    """
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    topics = _pydoc_topics()
    if topics is None:
        return data.stdlib_text(min_chars)
    pieces: list[str] = []
    length = 0
    for _, text in _distinct_topics(topics):
        pieces.append(text.strip())
        length += len(pieces[-1]) + 2
        if length - 2 >= min_chars:
            return "\n\n".join(pieces)
    raise ValueError(f"min_chars={min_chars} is more than the help topics hold; ask for at most {max(length - 2, 0)}")
