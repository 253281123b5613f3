"""The reports in a real browser: headless Chromium loads them, runs their script, and draws every chart.

Skipped only when Chromium is absent outside CI; under CI (CI=true) a missing Chromium fails
(.ci/install-browser.sh installs Debian's). Screenshots are written under each test's tmp_path.
"""

import os
import re
import time

import pytest
from support.browser import Chromium, find_chromium
from support.samples import trained_run, write_synthetic_run

from stepaudit.report import write_compare, write_report

PNG = b"\x89PNG\r\n\x1a\n"

# Every chart: its size on screen, how many marks were drawn inside its plot area, and its tick labels.
CHECK = """(() => {
  const figures = [...document.querySelectorAll('figure.card')].map(f => {
    const svg = f.querySelector('svg.chart');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    const drawn = svg ? [...svg.querySelectorAll('g[clip-path] > *')].filter(e => {
      const b = e.getBBox(); return b.width > 0 || b.height > 0; }).length : 0;
    return {id: f.id, width: box.width, height: box.height, drawn, ticks: svg ? svg.querySelectorAll('text.tick').length : 0};
  });
  return {figures, h1: document.querySelector('h1').textContent,
          overflow: document.documentElement.scrollWidth > window.innerWidth + 1};
})()"""

HOVER = """(() => {
  const svg = document.querySelector('#fig-loss svg');
  const r = svg.getBoundingClientRect();
  svg.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width * 0.5, clientY: r.top + r.height * 0.5, bubbles: true}));
  const tip = document.querySelector('#fig-loss .tip');
  return {display: tip.style.display, text: tip.textContent};
})()"""


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing under CI: run .ci/install-browser.sh (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium, or .ci/install-browser.sh)")
    with Chromium(executable) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    run = tmp_path_factory.mktemp("browser") / "sgd"
    return [(run, trained_run(run, steps=30, optimizer="sgd"))]


def long_run(tmp_path_factory):
    """One 100,000-step synthetic run per session, shared with the HTML tests."""
    run = tmp_path_factory.getbasetemp() / "synthetic-100k"
    if not (run / "stepaudit.sqlite").exists():
        write_synthetic_run(run, steps=100_000, modules=("embed", "blocks.0", "head"))
    return run


def check_page(browser, path, tmp_path, name, width=1280):
    page = browser.open(path.resolve().as_uri(), expression=CHECK, width=width)
    assert page.errors == [], f"the page logged errors: {page.errors}"
    assert page.requests == [path.resolve().as_uri()], f"the page fetched more than itself: {page.requests}"
    assert page.screenshot.startswith(PNG)
    (tmp_path / f"{name}.png").write_bytes(page.screenshot)
    figures = page.value["figures"]
    assert figures, "no charts on the page"
    for figure in figures:
        assert figure["width"] > 250 and figure["height"] > 100, f"{figure['id']} is not laid out: {figure}"
        assert figure["drawn"] > 0, f"{figure['id']} is empty"
        assert figure["ticks"] >= 3, f"{figure['id']} has no tick labels"
    return page


def test_run_report_in_chromium(browser, real, tmp_path):
    run, _ = real[0]
    page = check_page(browser, write_report(run), tmp_path, "report")
    ids = [f["id"] for f in page.value["figures"]]
    assert ids == [
        "fig-loss",
        "fig-promise",
        "fig-alpha",
        "fig-alpha-hist",
        "fig-ratio-heatmap",
        "fig-update",
        "fig-lr",
        "fig-norms",
    ]
    assert page.value["h1"] == "sgd" and not page.value["overflow"]
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_narrow_screen_has_no_horizontal_scroll(browser, real, tmp_path):
    run, _ = real[0]
    page = check_page(browser, write_report(run), tmp_path, "narrow", width=420)
    assert not page.value["overflow"]


# Every word of every table cell and card: split over two lines means it wrapped mid-word ("stepaudi / t").
SPLIT_WORDS = """(() => {
  const split = [];
  for (const cell of document.querySelectorAll('th, td, .kpi .k, .kpi .v')) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.textContent.matchAll(/[^\\s\\-/_.,]+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
        if (tops.size > 1) split.push(m[0]);
      }
    }
  }
  return split;
})()"""


@pytest.mark.parametrize("width", [1280, 420])
def test_no_word_wraps_mid_word(browser, real, tmp_path, width):
    run, _ = real[0]
    page = browser.open(write_report(run).resolve().as_uri(), expression=SPLIT_WORDS, width=width)
    (tmp_path / f"words-{width}.png").write_bytes(page.screenshot)
    assert page.errors == [] and page.value == [], f"words broken across lines at {width}px: {page.value}"


def test_hover_shows_the_values_under_the_cursor(browser, real, tmp_path):
    run, records = real[0]
    page = browser.open(write_report(run).resolve().as_uri(), expression=HOVER, screenshot=False)
    assert page.errors == []
    assert page.value["display"] == "block"
    assert page.value["text"].startswith("step ") and "training loss" in page.value["text"]
    step = int(re.match(r"step ([\d,]+)", page.value["text"]).group(1).replace(",", ""))
    assert abs(step - len(records) / 2) <= 2


def test_comparison_page_in_chromium(browser, real, tmp_path):
    other = write_synthetic_run(tmp_path / "synthetic", steps=30, name="synthetic")
    page = check_page(browser, write_compare([real[0][0], other], tmp_path / "compare.html"), tmp_path, "compare")
    assert {"fig-c-loss", "fig-c-lowered", "fig-c-alpha", "fig-c-update"} <= {f["id"] for f in page.value["figures"]}


def test_injected_script_in_a_run_name_renders_as_text(browser, tmp_path):
    evil = "<script>alert(1)</script>"
    run = write_synthetic_run(
        tmp_path / "evil",
        steps=30,
        name=evil,
        modules=("<img src=x onerror=alert(2)>",),
        meta={"param_groups": [{"lr": 0.05, "note": "<svg onload=alert(3)>"}]},
    )
    page = check_page(browser, write_report(run), tmp_path, "evil")
    assert page.dialogs == []
    assert page.value["h1"] == evil


def test_a_100k_step_report_opens_quickly(browser, tmp_path_factory, tmp_path):
    path = write_report(long_run(tmp_path_factory), tmp_path / "long.html")
    start = time.perf_counter()
    check_page(browser, path, tmp_path, "long")
    elapsed = time.perf_counter() - start
    print(f"100k-step report ({path.stat().st_size / 1e6:.2f} MB) loaded, checked and captured in {elapsed:.1f} s")
    assert elapsed < 30
