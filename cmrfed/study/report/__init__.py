"""STUDY/report/: the study's main table, its ablation, figures and one self-contained report.html.

Every number comes from the evaluated runs through the functions ``cmrfed compare`` uses
(:func:`cmrfed.eval.compare.summarise_methods` for the per-metric summaries, the per-setting
:class:`Comparison` for the tests); nothing statistical is computed here. What this module adds
is the study's shape:

- the main table (one (blocks, rank) setting): per method, mean ± sd over seeds and 95% CI of
  balanced accuracy, sensitivity, specificity, AUC, F1 and MCC, macro over sites and per site;
  the p-value against the reference (the study's test, Holm-corrected), effect size and pair
  count; trainable parameters, bytes per client per round and total bytes;
- the ablation: the tested metric with its CI against adapted blocks and rank, with the
  communication and the measured time per round beside it;
- the participation gap, when the study holds sites out: per method and held-out site, the
  tested metric of the site zero-shot, after ``cmrfed adapt`` and as a full member (the grid
  cell of the same method and seed), mean ± sd over seeds.

The folder is written atomically. The parts: :mod:`.document` (report.json, every number),
:mod:`.rows` (the tables as text and CSV rows), :mod:`.markdown` (report.md), :mod:`.figure`
(the ablation figure), :mod:`.page` (report.html, self-contained: figures embedded as base64 data
URIs, nothing loaded from the network).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.eval.report import FIGURES, ComparisonResult
from cmrfed.faults import fault_point
from cmrfed.study.config import StudyConfig
from cmrfed.study.newcomers import Newcomer
from cmrfed.study.plan import Cell
from cmrfed.study.report.document import ABLATION_FIGURE, study_document
from cmrfed.study.report.figure import plot_ablation
from cmrfed.study.report.markdown import markdown
from cmrfed.study.report.page import html_page
from cmrfed.study.report.rows import ablation_csv, long_rows, main_csv, participation_csv, write_csv


@dataclass(frozen=True)
class StudyReport:
    out: Path
    html: Path
    document: dict[str, Any]


def write_study_report(study: StudyConfig, out: Path, runs: Mapping[str, Path], cells: Sequence[Cell],
                       comparisons: Mapping[tuple[int | str, int], ComparisonResult],
                       newcomers: Sequence[Newcomer] = ()) -> StudyReport:
    """Write STUDY/report/ (replacing an older one only once the new one is complete)."""
    doc = study_document(study, runs, cells, comparisons, newcomers)
    target = paths.study_report_dir(out)
    main_compare = comparisons[(study.main_blocks, study.main_rank)].out
    with atomic_dir(target, overwrite=True) as tmp:
        write_json(tmp / "report.json", doc)
        (tmp / "report.md").write_text(markdown(doc), encoding="utf-8")
        write_csv(tmp / "main.csv", *main_csv(doc))
        write_csv(tmp / "summaries.csv", *long_rows(doc))
        write_csv(tmp / "ablation.csv", *ablation_csv(doc))
        if doc["participation"]:
            write_csv(tmp / "participation.csv", *participation_csv(doc))
        figures = {ABLATION_FIGURE: paths.report_figure_path(tmp, ABLATION_FIGURE)}
        plot_ablation(doc, figures[ABLATION_FIGURE])
        fault_point("study.report-write")
        for name in FIGURES:
            figures[name] = paths.report_figure_path(tmp, name)
            shutil.copyfile(paths.report_figure_path(main_compare, name), figures[name])
        (tmp / "report.html").write_text(html_page(doc, figures), encoding="utf-8")
    return StudyReport(target, target / "report.html", doc)
