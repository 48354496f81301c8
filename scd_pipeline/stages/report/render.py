"""The report as a document: blocks (paragraphs, tables, images) rendered to Markdown and to
self-contained HTML (PNGs embedded as base64, inline CSS)."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scd_pipeline.math.stats import Interval

RESOLVED_MARK = "*"     # resolved in the confirmatory family (Holm-adjusted)
EXPLORATORY_MARK = "°"  # an exploratory difference whose own p is below 1 - confidence


def difference_mark(record: dict) -> str:
    """The mark of one row of ``evidence.differences_frame``."""
    if not record.get("resolved"):
        return ""
    return RESOLVED_MARK if record.get("family") == "confirmatory" else EXPLORATORY_MARK


def as_float(value: Any) -> float:
    """A metric as float; None (undefined, written as null by evaluate) becomes NaN."""
    return float("nan") if value is None else float(value)


# --- the document: blocks rendered to Markdown and HTML -------------------------------------------

@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    bold_rows: set[int] = field(default_factory=set)
    bold_cells: set[tuple[int, int]] = field(default_factory=set)  # (row, column) in bold alone


@dataclass
class Image:
    file: str  # relative to the report, e.g. plots/aw_histogram.png
    caption: str


Block = tuple[str, Any]  # ("h2" | "h3" | "p" | "list", text) or ("table", Table) or ("image", Image)


def fmt(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def fmt_interval(interval: Interval | None, signed: bool = False, mark: str = "") -> str:
    """``0.800 [0.720, 0.870]``; signed ``+0.050 [+0.010, +0.090]*`` with the decision's ``mark``."""
    if interval is None or math.isnan(interval.estimate):
        return "n/a"
    form = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(interval.low):
        return form.format(interval.estimate)
    text = f"{form.format(interval.estimate)} [{form.format(interval.low)}, {form.format(interval.high)}]"
    return text + mark


def _markdown_table(table: Table) -> list[str]:
    cells = [[f"**{c}**" if c and (i in table.bold_rows or (i, j) in table.bold_cells) else c
              for j, c in enumerate(row)] for i, row in enumerate(table.rows)]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]  # a bare | would split the cell
    widths = [max([len(h), *(len(r[j]) for r in cells)]) for j, h in enumerate(table.headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    return [line(table.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            lines += _markdown_table(content) + [""]
        elif kind == "image":
            lines += [f"![{content.caption}]({content.file})", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans (the only Markdown markup in our text) into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(f"<td><b>{_inline_html(c)}</b></td>" if (i, j) in table.bold_cells else
                        f"<td>{_inline_html(c)}</td>" for j, c in enumerate(row))
        body.append(f'<tr class="best">{cells}</tr>' if i in table.bold_rows else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


HTML_STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #bbb;padding:0.25em 0.6em;
text-align:right}th:first-child,td:first-child{text-align:left}tr.best td{font-weight:bold;
background:#eef6ee}img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3}"""


def render_html(title: str, blocks: Sequence[Block], base: Path) -> str:
    """A self-contained page: images read from ``base / file`` and embedded as base64."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(content)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            parts.append(_html_table(content))
        elif kind == "image":
            data = base64.b64encode((base / content.file).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(content.caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>'
                         f"{html.escape(content.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
