"""report.html: one self-contained page (figures embedded as base64 data URIs, nothing loaded from
the network)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmrfed.study.report.document import ABLATION_FIGURE
from cmrfed.study.report.markdown import notes, participation_lines, privacy_lines
from cmrfed.study.report.rows import ablation_table, main_table, participation_table, site_table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#1d2430;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #d8dde6;padding:.3em .55em;text-align:right;white-space:pre}
th{white-space:normal;min-width:4em}
th{background:#eef1f6}td:first-child,th:first-child{text-align:left}
tr.reference td{background:#f6f9ee}ul.notes{font-size:.9em;color:#3b4556}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e4e7ee}
figcaption{font-size:.85em;color:#556}.warn{color:#8a5a00}
"""


FIGURE_CAPTIONS = {
    ABLATION_FIGURE: "Ablation: the tested metric with its 95% CI, the bytes each client sends and "
                     "receives per round, and the measured time per round, against the adapted blocks.",
    "metric_by_client": "Main setting: the tested metric per site and macro (mean over seeds, 95% CI).",
    "roc_by_client": "Main setting: ROC per site, test subjects pooled over seeds.",
    "metric_vs_bytes": "Main setting: macro metric of each run against the bytes it communicated.",
    "val_curves": "Main setting: mean client validation balanced accuracy per round, mean over seeds.",
}


def _html_table(header: list[str], rows: list[list[str]], reference: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        css = ' class="reference"' if reference is not None and row and row[0] == reference else ""
        # a summary's CI goes on its own line so the wide tables fit a page
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c.replace(' [', chr(10) + '['))}</td>"
                                           for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _participation_html(doc: Mapping[str, Any]) -> list[str]:
    lines = participation_lines(doc)
    if not lines:
        return []
    return [f"<h2>{html.escape(lines[0].removeprefix('## '))}</h2>",
            f'<p class="notes">{html.escape(lines[2])}</p>', _html_table(*participation_table(doc))]


def html_page(doc: Mapping[str, Any], figures: Mapping[str, Path]) -> str:
    reference = doc["reference"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(doc['title'])}</h1>",
        '<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes(doc)) + "</ul>",
        f"<h2>Main table (blocks {html.escape(str(doc['main']['blocks']))}, rank "
        f"{html.escape(str(doc['main']['rank']))})</h2>",
        _html_table(*main_table(doc), reference=reference),
        "<h2>Per site</h2>", _html_table(*site_table(doc), reference=reference),
        "<h2>Ablation: adapted blocks and rank</h2>", _html_table(*ablation_table(doc)),
        *_participation_html(doc),
        '<pre class="privacy">' + html.escape("\n".join(privacy_lines(doc))) + "</pre>",
    ]
    for name, path in figures.items():
        if name == "metric_by_client":
            parts.append("<h2>Main setting: figures</h2>")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure id="fig-{name}"><img alt="{html.escape(name)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>'
                     f"{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>")
    warnings = [w for s in doc["settings"] for w in s["warnings"]]
    warnings += [f"{m['method']} ({s['name']}): {w}" for s in doc["settings"] for m in s["methods"]
                 if m["test_vs_reference"] for w in m["test_vs_reference"]["warnings"]]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f'<li class="warn">{html.escape(w)}</li>' for w in dict.fromkeys(warnings)) + "</ul>")
    version = doc["versions"].get("cmrfed", "")
    parts.append(f'<p class="notes">Written by cmrfed study {html.escape(str(version))}; every number is '
                 "in report.json, main.csv, summaries.csv and ablation.csv next to this page.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
