"""The study's report.html as a reader sees it: opened in a real headless Chromium at 1400 px wide.

Chromium loads a copy of the page with a measuring script appended (``--dump-dom`` returns the DOM
once the page has loaded, with what the script found written into it), and takes a screenshot of
the page itself, kept as a test artefact next to the copy (``tmp_path``). What is checked is what
the reader would see:

- no Markdown survives in the rendered text (``## heading``, ``| a | b |`` rows, ``|---|``
  rules, ``**bold**``, `` `code` ``, ``[link](url)``): every section is HTML;
- nothing is wider than the window, every table either fits its container or scrolls inside
  it, so no column is cut off, and at 1400 px the main table fits whole (its bytes columns in
  sight).

A fast test renders the report's Markdown sections (a DP table included) to HTML without a browser.

Skipped when no Chromium is installed, except where ``CMRFED_REQUIRE_CHROMIUM=1`` (CI, which
installs Debian's ``chromium``) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from cmrfed import paths
from cmrfed.fed.privacy import privacy_markdown
from cmrfed.study.report.page import section_html

WIDTH, HEIGHT = 1400, 2400
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
REQUIRED = os.environ.get("CMRFED_REQUIRE_CHROMIUM") == "1"

MARKDOWN = {
    "a heading": re.compile(r"^\s*#{1,6} \S", re.M),
    "a table row": re.compile(r"^\s*\|.*\|\s*$", re.M),
    "a table rule": re.compile(r"\|\s*:?-{3,}"),
    "bold": re.compile(r"\*\*[^*\n]+\*\*"),
    "inline code": re.compile(r"`[^`\n]+`"),
    "a link": re.compile(r"\]\([^)\s]+\)"),
}
"""Markdown that a reader would see as raw characters if a section were not rendered."""

MEASURE = """
<script>
window.addEventListener("load", () => {
  const scrolls = (el) => ["auto", "scroll"].includes(getComputedStyle(el).overflowX);
  const body = document.body.getBoundingClientRect();
  const tables = [...document.querySelectorAll("table")].map((table, index) => {
    let box = table;
    while (box !== document.body && !scrolls(box)) box = box.parentElement;
    const scroller = box === document.body ? null : box;
    const visible = (scroller || table).getBoundingClientRect();
    return {index, scrolls: scroller !== null,
            content: scroller ? scroller.scrollWidth : table.getBoundingClientRect().width,
            box: visible.width, left: visible.left, right: visible.right,
            header: table.querySelector("tr") ? table.querySelector("tr").innerText.slice(0, 80) : ""};
  });
  const found = {width: window.innerWidth, page: document.documentElement.scrollWidth,
                 body: {left: body.left, right: body.right}, tables, text: document.body.innerText};
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "cmrfed-measure";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>
"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
               f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _measure(page: Path, workdir: Path) -> dict:
    probe = workdir / "report-measured.html"
    html = page.read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    done = _chromium("--dump-dom", probe.as_uri(), profile=workdir / "profile-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<script type="application/json" id="cmrfed-measure">(.*?)</script>', done.stdout,
                      re.S)
    assert found, f"the measuring script did not run:\n{done.stderr[-2000:]}"
    return json.loads(unescape(found.group(1)))


@pytest.fixture()
def chromium() -> str:
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("CMRFED_REQUIRE_CHROMIUM=1 but no chromium binary is installed "
                        "(apt-get install chromium)")
        pytest.skip("needs a chromium binary (apt-get install chromium); CI requires it")
    return CHROMIUM


@pytest.mark.e2e  # starts a browser
def test_report_reads_as_html_and_no_table_is_cut_off(chromium, toy_study, tmp_path):
    _, result = toy_study
    page = paths.study_report_dir(result.out) / "report.html"
    found = _measure(page, tmp_path)
    assert found["width"] == WIDTH

    text = found["text"]
    assert "Differential privacy" in text and "Main table" in text
    leftovers = {kind: pattern.findall(text)[:3] for kind, pattern in MARKDOWN.items()
                 if pattern.search(text)}
    assert not leftovers, f"Markdown left unrendered in report.html: {leftovers}"

    assert found["page"] <= WIDTH, f"the page is {found['page']} px wide in a {WIDTH} px window"
    assert found["tables"], "report.html has no table"
    for table in found["tables"]:
        where = f"table {table['index']} ({table['header']!r})"
        assert table["left"] >= found["body"]["left"] - 1 and table["right"] <= found["body"]["right"] + 1, (
            f"{where} sticks out of the page: {table}")
        assert table["scrolls"] or table["content"] <= table["box"] + 1, (
            f"{where} is {table['content']} px wide in a {table['box']} px box that does not scroll")

    main = found["tables"][0]
    assert main["content"] <= main["box"] + 1, (
        f"the main table is {main['content']} px wide in a {main['box']} px page: its last columns "
        "(the bytes) are out of sight")

    shot = tmp_path / "report.png"  # the artefact: the page as the reader sees it
    done = _chromium(f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "profile-shot")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from matplotlib.image import imread

    image = imread(shot)
    assert image.shape[:2] == (HEIGHT, WIDTH)
    rgb = image[..., :3]
    # not a blank page: text, table rules and the embedded figures' colours are on it
    assert (rgb.min(axis=2) < 0.5).mean() > 0.01
    assert (rgb.std(axis=2) > 0.1).mean() > 0.001  # coloured pixels: the figures' lines and bars


def test_markdown_sections_become_html_tables_and_text():
    """The DP section with DP runs (a pipe table) and the one without: HTML, no Markdown left."""
    site = {"epsilon": 2.91, "noise_multiplier": 1.12, "sample_rate": 0.25, "steps": 12, "delta": 1e-5}
    summary = {"target_epsilon": 3.0, "clip": 1.0, "accountant": "rdp", "sites": {"ge": site, "canon": site}}
    runs = [("duallora", 0, "dp-run"), ("fedlora", 0, "plain-run")]
    for lines in (privacy_markdown(runs, {"dp-run": summary, "plain-run": None}),
                  privacy_markdown(runs, {})):
        page = "\n".join(section_html(lines))
        assert page.startswith("<h2>Differential privacy (per site, whole run)</h2>")
        text = unescape(re.sub(r"<[^>]+>", "\n", page))
        leftovers = {kind: found for kind, pattern in MARKDOWN.items() if (found := pattern.findall(text))}
        assert not leftovers, leftovers
    dp = section_html(privacy_markdown(runs, {"dp-run": summary, "plain-run": None}))
    table = next(part for part in dp if "<table>" in part)
    assert table.count("<tr") == 3 and "<th>target eps</th>" in table and "<td>not DP</td>" in table
    assert "---" not in table
