"""One self-contained HTML page: PNGs inlined as base64 data URIs, tables as plain HTML, inline CSS, no script.

A single file can be mailed, attached to a ticket or opened from a cluster's scratch folder with nothing
else reachable; every value is escaped, and numbers keep enough digits to be traced back to runs.csv.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem 2rem; color: #1b1b1b; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem;
margin-top: 2rem; } h3 { font-size: 1rem; margin-bottom: .3rem; }
table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d0d0; padding: .2rem .45rem; text-align: right; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; } td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; } .note { color: #555; font-size: .85rem; max-width: 60rem; }
.ids { color: #666; font-size: .7rem; font-family: ui-monospace, monospace; } img { max-width: 100%; }
code { font-size: .8rem; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell's text: ints with thousands separators, floats with 4 significant digits, None as an em dash."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.4g}"
    return str(value)


def cell(value: Any, ids: Sequence[str] | str | None = None) -> str:
    """A value with the run ids it came from underneath (the table's traceability)."""
    text = esc(fmt(value))
    if ids:
        joined = ids if isinstance(ids, str) else " ".join(ids)
        text += f'<br><span class="ids">{esc(joined)}</span>'
    return text


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Rows of already-rendered (escaped) cells; string-looking columns are left-aligned by the caller's class."""
    head = "".join(f"<th>{esc(c)}</th>" for c in (header or columns))
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _td(content: str) -> str:
    plain = html.unescape(content.split("<", 1)[0]).replace(",", "").replace("—", "")
    try:
        float(plain)
        return f"<td>{content}</td>"
    except ValueError:
        return f'<td class="text">{content}</td>' if plain else f"<td>{content}</td>"


def records_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Dict rows as a table, every column (union, first-seen order) unless given."""
    cols = list(columns or dict.fromkeys(k for r in records for k in r))
    return table(cols, [[cell(r.get(c)) for c in cols] for r in records])


def matrix_table(matrix: Mapping[str, Any]) -> str:
    """An experiment matrix ({rows, cols, values}) as a table with its row labels."""
    rows = [
        [f"<b>{esc(label)}</b>", *(cell(v) for v in values)]
        for label, values in zip(matrix["rows"], matrix["values"], strict=True)
    ]
    return table(["", *map(str, matrix["cols"])], rows)


def image(path: Path, alt: str) -> str:
    """The PNG inlined as a data URI, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{data}"></p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>' if text else ""


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def render(title: str, intro: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The page: a title, an intro paragraph (already rendered), a contents line and (title, anchor, body) sections."""
    contents = " · ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for t, a, _ in sections)
    parts = [section(t, body, a) for t, a, body in sections]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>{intro}<p>{contents}</p>{''.join(parts)}</body></html>\n"
    )
