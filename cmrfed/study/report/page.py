"""report.html: one self-contained page (figures embedded as base64 data URIs, nothing loaded from
the network)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmrfed.eval.consortium import headline, site_rows, transfer_rows
from cmrfed.study.report.document import ABLATION_FIGURE, CONSORTIUM_FIGURE
from cmrfed.study.report.markdown import notes, participation_lines, privacy_lines, report_warnings
from cmrfed.study.report.rows import ablation_table, main_table, site_table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#1d2430;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #d8dde6}
div.table{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse;font-size:.8em}
th,td{border:1px solid #d8dde6;padding:.25em .4em;text-align:right;white-space:pre}
th{white-space:normal;min-width:4em}
th{background:#eef1f6}td:first-child,th:first-child{text-align:left}
tr.reference td{background:#f6f9ee}ul.notes,p.notes{font-size:.9em;color:#3b4556}
code{font-size:.95em;background:#f1f3f7;padding:0 .2em;border-radius:3px}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e4e7ee}
figcaption{font-size:.85em;color:#556}.warn{color:#8a5a00}
"""


FIGURE_CAPTIONS = {
    CONSORTIUM_FIGURE: "The consortium before training (cmrfed inspect): each site's abnormal share against "
                       "the pooled one, the intensity distances between sites, and the transfer of a "
                       "linear probe on frozen features from one site to another.",
    ABLATION_FIGURE: "Ablation: the tested metric with its 95% CI, the bytes each client sends and "
                     "receives per round, and the measured time per round, against the adapted blocks.",
    "metric_by_client": "Main setting: the tested metric per site and macro (mean over seeds, 95% CI).",
    "roc_by_client": "Main setting: ROC per site, test subjects pooled over seeds.",
    "metric_vs_bytes": "Main setting: macro metric of each run against the bytes it communicated.",
    "val_curves": "Main setting: mean client validation balanced accuracy per round, mean over seeds.",
}


def _html_table(header: list[str], rows: list[list[str]], reference: str | None = None) -> str:
    """A table in a box of the page's width that scrolls sideways when the table is wider, so no
    column is ever cut off."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        css = ' class="reference"' if reference is not None and row and row[0] == reference else ""
        # a summary's CI goes on its own line so the wide tables fit a page
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c.replace(' [', chr(10) + '['))}</td>"
                                           for c in row) + "</tr>")
    return (f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """A line of the report's Markdown as HTML text: escaped, its `code` spans as <code>."""
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _is_rule(cells: list[str]) -> bool:
    return all(cell and set(cell) <= set("-:") for cell in cells)


def section_html(lines: list[str]) -> list[str]:
    """A section as the Markdown writers produce it (a ``## heading``, paragraphs, pipe tables),
    as HTML: the page says what report.md says, and shows no Markdown."""
    parts: list[str] = []
    table: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            header, *rows = table
            parts.append(_html_table(header, [row for row in rows if not _is_rule(row)]))
            table = []
        if line.startswith("## "):
            parts.append(f"<h2>{_inline(line.removeprefix('## '))}</h2>")
        elif line.strip():
            parts.append(f'<p class="notes">{_inline(line)}</p>')
    return parts


def _figure(name: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{name}"><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>")


def _consortium_html(doc: Mapping[str, Any], figures: Mapping[str, Path]) -> list[str]:
    consortium = doc.get("consortium")
    if not consortium:
        return []
    return ["<h2>The consortium: how non-IID are the sites? (cmrfed inspect)</h2>",
            '<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in headline(consortium))
            + "</ul>", _html_table(*site_rows(consortium)), _html_table(*transfer_rows(consortium)),
            _figure(CONSORTIUM_FIGURE, figures[CONSORTIUM_FIGURE])]


def html_page(doc: Mapping[str, Any], figures: Mapping[str, Path]) -> str:
    reference = doc["reference"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(doc['title'])}</h1>",
        '<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in notes(doc)) + "</ul>",
        *_consortium_html(doc, figures),
        f"<h2>Main table (blocks {html.escape(str(doc['main']['blocks']))}, rank "
        f"{html.escape(str(doc['main']['rank']))})</h2>",
        _html_table(*main_table(doc), reference=reference),
        "<h2>Per site</h2>", _html_table(*site_table(doc), reference=reference),
        "<h2>Ablation: adapted blocks and rank</h2>", _html_table(*ablation_table(doc)),
        *section_html(participation_lines(doc)),
        *section_html(privacy_lines(doc)),
    ]
    for name, path in figures.items():
        if name == CONSORTIUM_FIGURE:
            continue  # shown with the consortium, at the top
        if name == "metric_by_client":
            parts.append("<h2>Main setting: figures</h2>")
        parts.append(_figure(name, path))
    if warnings := report_warnings(doc):
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>")
    version = doc["versions"].get("cmrfed", "")
    parts.append(f'<p class="notes">Written by cmrfed study {html.escape(str(version))}; every number is '
                 "in report.json, main.csv, summaries.csv and ablation.csv next to this page.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
