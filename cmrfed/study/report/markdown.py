"""report.md, and the notes and sections report.html shares with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmrfed.eval.report import FIGURES
from cmrfed.fed.privacy import privacy_markdown
from cmrfed.study.report.document import ABLATION_FIGURE
from cmrfed.study.report.rows import ablation_table, main_table, participation_table, site_table


def participation_lines(doc: Mapping[str, Any]) -> list[str]:
    part = doc.get("participation")
    if not part:
        return []
    lr = part["adapt"]["lr"]
    return [
        "## Participation gap: a site that did not train", "",
        f"Each held-out site ({', '.join(part['holdout'])}) is left out of a run of the main setting "
        f"(`federate --holdout`), per method and seed; it is then scored on its own "
        f"{doc['split']} split zero-shot (the run's shared tensors, its own adapter at its start), "
        f"after `cmrfed adapt` ({part['adapt']['epochs']} epochs on its own train split, "
        f"{'the run' + chr(39) + 's learning rate' if lr is None else f'lr {lr:g}'}, the epoch with "
        f"the lowest val loss kept), and as a full member (the same method and seed with every site "
        f"training). Metric: {part['metric'].replace('_', ' ')}, mean ± sd over seeds.", "",
        *md_table(*participation_table(doc)), "",
    ]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def notes(doc: Mapping[str, Any]) -> list[str]:
    main = doc["main"]
    return [
        f"Main setting: last {main['blocks']} blocks adapted, rank {main['rank']}; backbone "
        f"`{doc['backbone']}`; evaluated split `{doc['split']}`, round `{doc['round']}`; sites: "
        f"{', '.join(doc['clients'])}.",
        "Metrics: macro over sites of each site's own model; mean ± sd over seeds [95% CI: a t-interval "
        "over seeds clipped to the metric's range, or a single run's subject bootstrap].",
        f"Test: {doc['test']} against {doc['reference']} on {doc['tested_metric']} ({doc['pairing']}); "
        "p Holm-corrected across the baselines; effect = reference minus baseline.",
        "Trainable params: scalars a client's model trains (its shared plus private tensors). Bytes: "
        "as serialised per client per round, and up + down for the whole run, mean over seeds.",
    ]


def privacy_lines(doc: Mapping[str, Any]) -> list[str]:
    """The main setting's "Differential privacy" section (the same one every report prints)."""
    runs = [(method, seed, cell) for method, seed, cell in doc["privacy"]["runs"]]
    return privacy_markdown(runs, doc["privacy"]["summaries"])


def markdown(doc: Mapping[str, Any]) -> str:
    lines = [f"# {doc['title']}", "", *(f"- {note}" for note in notes(doc)), "",
             f"## Main table (blocks {doc['main']['blocks']}, rank {doc['main']['rank']})", "",
             *md_table(*main_table(doc)), "", "## Per site", "", *md_table(*site_table(doc)), "",
             "## Ablation: adapted blocks and rank", "", *md_table(*ablation_table(doc)), "",
             f"![ablation]({ABLATION_FIGURE}.png)", "", *participation_lines(doc), *privacy_lines(doc), ""]
    for name in FIGURES:
        lines.append(f"![{name}]({name}.png)")
    warnings = [w for s in doc["settings"] for w in s["warnings"]]
    warnings += [f"{m['method']} ({s['name']}): {w}" for s in doc["settings"] for m in s["methods"]
                 if m["test_vs_reference"] for w in m["test_vs_reference"]["warnings"]]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in dict.fromkeys(warnings))]
    return "\n".join(lines) + "\n"
