"""The arena report's document model (headings, paragraphs, tables, images, foldable details) and
its two renderings: Markdown (plots as PNG files beside it) and one self-contained HTML page (inline
CSS, plots as base64 data URIs, no external URL, no network)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    """A table cell or paragraph with a tone (``"bad"``, ``"warn"``, ``"good"``, ``"muted"`` or ``""``)."""

    text: str
    tone: str = ""


Cell = str | Text


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str
    tone: str = ""


@dataclass(frozen=True)
class Table:
    """``rows`` of cells under ``headers``; the columns in ``numeric`` are right-aligned numbers."""

    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: range = range(0)


@dataclass(frozen=True)
class Image:
    """A PNG plot: written as ``filename`` beside the Markdown, inlined in the HTML."""

    filename: str
    alt: str
    data: bytes


@dataclass(frozen=True)
class Details:
    """Blocks folded away under ``summary`` (a ``<details>`` element in HTML)."""

    summary: str
    blocks: tuple = ()


Block = Heading | Para | Table | Image | Details

_MARKS = {"bad": "**", "warn": "**", "good": "", "muted": "", "": ""}
_ICONS = {"bad": "⚠ ", "warn": "⚠ ", "good": "✓ ", "muted": "", "": ""}


def _text(cell: Cell) -> tuple[str, str]:
    return (cell.text, cell.tone) if isinstance(cell, Text) else (str(cell), "")


def _md_cell(cell: Cell) -> str:
    text, tone = _text(cell)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"{_MARKS[tone]}{text}{_MARKS[tone]}" if text else ""


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + block.text, ""]
    if isinstance(block, Para):
        mark = _MARKS[block.tone]
        return [f"{_ICONS[block.tone]}{mark}{block.text}{mark}", ""]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.filename})", ""]
    if isinstance(block, Details):
        return [f"**{block.summary}**", ""] + [line for inner in block.blocks for line in _md_block(inner)]
    aligns = ["---:" if i in block.numeric else "---" for i in range(len(block.headers))]
    lines = ["| " + " | ".join(block.headers) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in block.rows]
    return [*lines, ""]


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; images refer to the PNG files written beside it."""
    return "\n".join(line for block in blocks for line in _md_block(block)).rstrip() + "\n"


def escape(text: str) -> str:
    """HTML-escape ``text`` and turn `backticked` spans into ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _html_cell(cell: Cell, tag: str, numeric: bool) -> str:
    text, tone = _text(cell)
    classes = " ".join(c for c in (f"tone-{tone}" if tone else "", "num" if numeric else "") if c)
    body = f'<span class="badge">{escape(text)}</span>' if tone in ("bad", "warn", "good") else escape(text)
    return f'<{tag} class="{classes}">{body}</{tag}>' if classes else f"<{tag}>{body}</{tag}>"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f'<h{block.level} id="{_anchor(block.text)}">{escape(block.text)}</h{block.level}>'
    if isinstance(block, Para):
        tone = f' class="note tone-{block.tone}"' if block.tone else ""
        return f"<p{tone}>{_ICONS[block.tone]}{escape(block.text)}</p>"
    if isinstance(block, Image):
        uri = "data:image/png;base64," + base64.b64encode(block.data).decode("ascii")
        caption = f"<figcaption>{escape(block.alt)}</figcaption>"
        return f'<figure><img src="{uri}" alt="{html.escape(block.alt)}">{caption}</figure>'
    if isinstance(block, Details):
        inner = "\n".join(_html_block(b) for b in block.blocks)
        return f"<details><summary>{escape(block.summary)}</summary>\n{inner}\n</details>"
    head = "".join(_html_cell(h, "th", i in block.numeric) for i, h in enumerate(block.headers))
    body = "\n".join(
        "<tr>" + "".join(_html_cell(c, "td", i in block.numeric) for i, c in enumerate(row)) + "</tr>"
        for row in block.rows
    )
    kind = " provenance" if not any(block.headers) else ""
    table = f'<table class="data{kind}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'
    return f'<div class="table-wrap">{table}</div>'


_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg-alt: #f6f8fa; --accent: #0b5cad;
  --bad: #b42318; --bad-bg: #fee4e2; --warn: #8a5300; --warn-bg: #fff4d6; --good: #1a7f37; --good-bg: #dcfce7; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
  font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 28px; margin: 8px 0 16px; padding-bottom: 8px; border-bottom: 3px solid var(--accent); }
h2 { font-size: 22px; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 28px 0 8px; color: #24292f; }
nav { font-size: 14px; margin: 0 0 8px; color: var(--muted); }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
p { max-width: 920px; }
code { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; background: var(--bg-alt); padding: 1px 4px;
  border-radius: 4px; }
.note { padding: 10px 14px; border-radius: 6px; border-left: 4px solid; }
p.tone-bad { background: var(--bad-bg); border-color: var(--bad); color: var(--bad); font-weight: 600; }
p.tone-warn { background: var(--warn-bg); border-color: var(--warn); color: var(--warn); }
p.tone-good { background: var(--good-bg); border-color: var(--good); color: var(--good); }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table.data { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
table.data th, table.data td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left;
  white-space: nowrap; vertical-align: top; }
table.data th { background: var(--bg-alt); font-weight: 600; position: sticky; top: 0; }
table.data tbody tr:nth-child(even) { background: #fbfcfd; }
table.data tbody tr:hover { background: #eef5ff; }
table.data td:last-child { white-space: normal; min-width: 90px; }
table.provenance thead { display: none; }
table.provenance td:first-child { font-weight: 600; }
.num { text-align: right !important; }
td.tone-muted { color: var(--muted); }
td.tone-good { color: var(--good); }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-weight: 600; font-size: 12px; }
.tone-bad .badge { background: var(--bad-bg); color: var(--bad); }
.tone-warn .badge { background: var(--warn-bg); color: var(--warn); }
.tone-good .badge { background: var(--good-bg); color: var(--good); }
td.num.tone-good .badge { background: none; padding: 0; font-weight: 600; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { font-size: 12px; color: var(--muted); }
details { margin: 8px 0 16px; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
"""

_SCRIPT = (
    "window.addEventListener('load', function () {"
    " var n = 0; document.querySelectorAll('img').forEach(function (img) { if (img.naturalWidth > 0) n++; });"
    " document.body.dataset.imagesLoaded = String(n); });"
)


def to_html(blocks: Sequence[Block], title: str = "attnzoo arena report") -> str:
    """One self-contained page: inline CSS, images as data URIs, a table of contents of the ``h2``
    sections, and a script that records in ``body[data-images-loaded]`` how many images decoded."""
    sections = [b.text for b in blocks if isinstance(b, Heading) and b.level == 2]
    nav = "".join(f'<a href="#{_anchor(text)}">{escape(text)}</a>' for text in sections)
    rendered = [_html_block(block) for block in blocks]
    # The table of contents goes right under the title.
    at = 1 if blocks and isinstance(blocks[0], Heading) and blocks[0].level == 1 else 0
    body = "\n".join([*rendered[:at], f"<nav>{nav}</nav>", *rendered[at:]])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
