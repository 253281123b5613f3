"""The HTML report and comparison page: self-contained, every chart drawn from the recorded numbers, escaped."""

import html
import json
import math
import re
import sqlite3
import sys
import time
import types

import pytest
from support.samples import trained_run, write_synthetic_run

from stepaudit.report import render_report, write_compare, write_report
from stepaudit.report.data import load_run

ALWAYS = ("loss", "promise", "alpha", "alpha-hist", "ratio-heatmap", "update", "lr", "norms")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """40 audited steps of SGD with momentum on the digits MLP, and the records the audit kept in memory."""
    run = tmp_path_factory.mktemp("real") / "momentum"
    return run, trained_run(run, steps=40, optimizer="momentum")


def figure_ids(text):
    return re.findall(r'<figure class="card[^"]*" id="fig-([^"]+)"', text)


def tips(text, figure):
    """The hover data of a time chart: what the chart drew, per series."""
    match = re.search(rf'id="fig-{re.escape(figure)}".*?data-tip="([^"]*)"', text, re.S)
    return json.loads(html.unescape(match.group(1)))


def figure_svg(text, figure):
    return re.search(rf'id="fig-{re.escape(figure)}".*?(<svg.*?</svg>)', text, re.S).group(1)


def g4(value):
    return float(f"{value:.4g}") if math.isfinite(value) else None


def test_report_is_self_contained_and_has_every_recorded_chart(real):
    run, _ = real
    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    for external in ("<link", " src=", "http://", "https://", "@import", "url(http"):
        assert external not in text, f"the report references something outside itself: {external}"
    assert "default-src 'none'" in text  # the page may not load anything even if it tried
    assert figure_ids(text) == list(ALWAYS)  # sharpness, noise … were not recorded: no empty charts
    for figure in ALWAYS:
        svg = figure_svg(text, figure)
        assert re.search(r'<path d="M|<rect x=|<circle', svg), f"chart {figure} draws nothing"
        assert re.search(r'class="tick"', svg) and re.search(r'class="label"', svg), f"chart {figure} has no axes"
    assert ">SGD<" in text and ">momentum<" in text and ">0.9<" in text and ">torch<" in text


def test_loss_chart_plots_the_losses_the_audit_recorded(real):
    run, records = real
    series = tips(render_report(load_run(run)), "loss")
    assert [s["n"] for s in series] == ["training loss (batch, before the step)", "same batch, after the step"]
    assert series[0]["x"] == [r["step"] for r in records]
    assert series[0]["y"] == [g4(r["loss_before"]) for r in records]
    assert series[1]["y"] == [g4(r["loss_after"]) for r in records]


def test_headline_numbers_match_the_records(real):
    run, records = real
    text = render_report(load_run(run))
    lowered = sum(r["verdict"] == "decrease" for r in records) / len(records)
    assert re.search(rf'<div class="v">{round(lowered * 100)}%</div><div class="k">steps that lowered the loss', text)
    assert re.search(r'<div class="v">40</div><div class="k">audited steps', text)


def test_promise_scatter_places_and_colours_every_step(real):
    run, records = real
    svg = figure_svg(render_report(load_run(run)), "promise")
    dots = re.findall(r'<circle cx="[^"]+" cy="[^"]+" r="[^"]+" fill="(#[0-9a-f]+)"[^>]*><title>step (\d+):', svg)
    colours = {"decrease": "#16a34a", "increase": "#dc2626", "flat": "#9ca3af"}
    assert sorted(int(s) for _, s in dots) == [r["step"] for r in records]
    assert {int(s): c for c, s in dots} == {r["step"]: colours[r["verdict"]] for r in records}
    assert 'class="diagonal"' in svg


def test_heatmap_has_a_row_per_module_and_the_guide(real):
    run, records = real
    svg = figure_svg(render_report(load_run(run)), "ratio-heatmap")
    modules = sorted({row["name"] for r in records for row in r["layers"] if row["kind"] == "module"})
    # the digits MLP 64-256-256-10: Linear layers at 0, 2, 4, each row named by path, type and weight shape
    assert modules == ["0", "2", "4"]
    named = ["0 · Linear 256×64", "2 · Linear 256×256", "4 · Linear 10×256"]
    assert sorted(set(re.findall(r"<title>([^<,]+), steps", svg))) == named
    assert len(re.findall(r"<title>[^<]+, steps", svg)) == len(modules) * len(records)
    assert "10⁻³ guide" in svg


def test_optional_charts_appear_when_recorded(tmp_path):
    run = write_synthetic_run(tmp_path / "probed", steps=400)
    text = render_report(load_run(run))
    assert figure_ids(text) == list(ALWAYS) + ["sharpness", "noise"]
    sharp = tips(text, "sharpness")
    assert sharp[0]["x"] == list(range(0, 400, 100))
    assert set(sharp[1]["y"]) == {40.0}  # the bound 2/η at η = 0.05
    assert "stability bound 2/η" in text


def long_run(tmp_path_factory):
    """One 100,000-step synthetic run per session, shared with the browser test."""
    run = tmp_path_factory.getbasetemp() / "synthetic-100k"
    if not (run / "stepaudit.sqlite").exists():
        write_synthetic_run(run, steps=100_000, modules=("embed", "blocks.0", "head"))
    return run


def test_a_100k_step_report_is_small_fast_and_keeps_its_spikes(tmp_path_factory):
    run = long_run(tmp_path_factory)
    start = time.perf_counter()
    path = write_report(run)
    elapsed = time.perf_counter() - start
    size = path.stat().st_size
    print(f"100k-step report: {size / 1e6:.2f} MB in {elapsed:.1f} s")
    assert size < 5e6
    assert elapsed < 60  # a few seconds on an idle machine; generous for a loaded CI runner
    db = sqlite3.connect(run / "stepaudit.sqlite")
    highest = db.execute("SELECT max(loss_before) FROM steps").fetchone()[0]
    lowest_alpha = db.execute("SELECT min(alpha) FROM steps").fetchone()[0]
    text = path.read_text()
    loss = tips(text, "loss")[0]
    assert len(loss["x"]) < 1000 and loss["hi"] is not None  # downsampled …
    assert max(v for v in loss["hi"] if v is not None) == g4(highest)  # … without losing the highest spike
    assert min(v for v in tips(text, "alpha")[0]["lo"] if v is not None) == g4(lowest_alpha)
    assert text.count("<title>non-finite loss</title>") == 1 and "non-finite step (3)" in text


def test_every_user_string_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    meta = {
        "model": "<svg onload=alert(2)>",
        "optimizer": "SGD<img src=x onerror=alert(3)>",
        "param_groups": [{"lr": 0.05, "note": "</td><script>alert(4)</script>"}],
        "diagnoses": [
            {
                "code": "<b>code</b>",
                "severity": "high",
                "confidence": 0.8,
                "first_step": 1,
                "evidence": {"<k>": "<v onclick=alert(5)>"},
                "fix": "<script>alert(6)</script>",
            }
        ],
    }
    run = write_synthetic_run(
        tmp_path / "evil", steps=50, name=evil, meta=meta, modules=("<img src=x onerror=alert(7)>", "blocks.0")
    )
    text = render_report(load_run(run))
    for raw in (evil, meta["model"], meta["optimizer"], "<script>alert(4)", "<b>code</b>", "<v onclick", "<img src=x"):
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(7)&gt;" in text
    compare = write_compare([run, run], tmp_path / "compare.html").read_text()
    assert evil not in compare and "&lt;script&gt;alert(1)&lt;/script&gt;" in compare


def fake_doctor(diagnose):
    module = types.ModuleType("stepaudit.doctor")
    module.diagnose = diagnose
    return module


def test_findings_are_shown_first_and_a_failing_doctor_does_not_break_the_report(tmp_path, monkeypatch):
    run = write_synthetic_run(tmp_path / "sick", steps=60, meta={"diagnoses": [{"code": "stored_finding", "fix": "x"}]})
    seen = {}

    def diagnose(records, meta=None):
        seen["records"], seen["meta"] = records, meta
        return [
            {
                "code": "lr_too_high",
                "severity": "high",
                "confidence": 0.9,
                "first_step": 3,
                "evidence": {"median_alpha": 1.7},
                "fix": "lower the learning rate 3×",
            }
        ]

    monkeypatch.setitem(sys.modules, "stepaudit.doctor", fake_doctor(diagnose))
    text = render_report(load_run(run))
    assert len(seen["records"]) == 60 and seen["records"][0]["layers"]  # records as Audit keeps them
    assert text.index("The doctor") < text.index("Step by step")
    assert "stored_finding" in text and "lr_too_high" in text and "lower the learning rate 3×" in text
    assert "confidence 90%" in text and "from step 3" in text

    def broken(records, meta=None):
        raise RuntimeError("rule exploded")

    monkeypatch.setitem(sys.modules, "stepaudit.doctor", fake_doctor(broken))
    text = render_report(load_run(run))
    assert "the doctor failed on this run: RuntimeError: rule exploded" in text and "stored_finding" in text

    monkeypatch.setitem(sys.modules, "stepaudit.doctor", None)  # not installed: stored findings only
    assert "lr_too_high" not in render_report(load_run(run))


def test_comparison_overlays_each_run(tmp_path, real):
    momentum, records = real
    sgd = write_synthetic_run(tmp_path / "sgd", steps=40, name="sgd")
    path = write_compare([momentum, sgd], tmp_path / "out" / "compare.html")
    text = path.read_text()
    loss = tips(text, "c-loss")
    assert [s["n"] for s in loss] == ["momentum", "sgd"]
    assert loss[0]["y"] == [g4(r["loss_before"]) for r in records]
    assert "<th>Δloss/g·Δw</th>" in text and text.count('<span class="swatch"') == 2
    assert re.search(r'id="fig-c-update".*?10⁻³', text, re.S)
    with pytest.raises(ValueError, match="at least one run"):
        write_compare([], tmp_path / "none.html")


def test_failed_audits_and_probes_are_named_and_an_empty_run_renders(tmp_path):
    from stepaudit.store import RunStore

    store = RunStore(tmp_path / "broken", {"model": "M", "optimizer": "SGD"})
    for step in (0, 1):
        store.append({"step": step, "verdict": "error", "error": "RuntimeError: <boom>"})
    store.append(
        {
            "step": 2,
            "verdict": "decrease",
            "loss_before": 1.0,
            "loss_after": 0.9,
            "delta": -0.1,
            "first_order": -0.12,
            "probe_errors": {"sharpness": "ValueError: <bad>"},
        }
    )
    store.close()
    text = render_report(load_run(tmp_path / "broken"))
    assert "2 audited steps could not be measured; first at step 0: RuntimeError: &lt;boom&gt;" in text
    assert "probes failed on 1 step; first: sharpness at step 2: ValueError: &lt;bad&gt;" in text
    assert "<boom>" not in text and "<bad>" not in text
    RunStore(tmp_path / "empty", {"model": "M"}).close()
    assert "This run has no audited steps yet." in render_report(load_run(tmp_path / "empty"))


def audited_fit(run, model, opt, inputs: int, steps: int, batch: int = 8, after_step=None):
    """``steps`` audited SGD steps of cross-entropy on random batches; ``after_step(step, audit)`` after each."""
    import torch

    import stepaudit

    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    audit = stepaudit.Audit(model, opt, loss_fn, run=run)
    for step in range(steps):
        data = (torch.randn(batch, inputs), torch.randint(0, 2, (batch,)))
        with audit.watch(data):
            opt.zero_grad()
            loss_fn(model, data).backward()
            opt.step()
        if after_step is not None:
            after_step(step, audit)
    return audit


def test_lr_chart_draws_the_scheduled_learning_rate(tmp_path):
    """The lr chart's points are StepLR's closed form lr₀·γ^⌊t/k⌋, step by step (not what the audit wrote, recomputed)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    audited_fit(tmp_path / "lr", model, opt, 4, 9, batch=16, after_step=lambda step, audit: scheduler.step()).close()
    drawn = tips(render_report(load_run(tmp_path / "lr")), "lr")[0]
    assert drawn["x"] == list(range(9))
    assert drawn["y"] == [g4(0.2 * 0.1 ** (t // 3)) for t in range(9)]


def test_metadata_tables_use_human_names_and_skip_missing_values(tmp_path):
    meta = {
        "summary": {
            "audited_steps": 3,
            "share_decrease": 2 / 3,
            "median_alpha": math.nan,
            "last_loss": 0.5,
            "first_loss": None,
        },
        "test_accuracy": 0.97,
        "modules": {"0": "Linear 4×3"},
    }
    text = render_report(load_run(write_synthetic_run(tmp_path / "meta", steps=30, meta=meta)))
    section = text[text.index('id="metadata"') :]
    assert "<th>share of steps that lowered their batch&#x27;s loss</th><td>67%</td>" in section
    assert "<th>last loss (final step&#x27;s batch)</th><td>0.5</td>" in section
    assert "<th>test accuracy</th><td>0.97</td>" in section and "Results the run stored" in section
    assert "median α" not in section and "first loss" not in section and ">nan<" not in section.lower()
    assert "share_decrease" not in section and "Other metadata" not in section


def test_compare_names_each_optimizer_with_its_hyperparameters_and_stored_result(tmp_path):
    nesterov = write_synthetic_run(
        tmp_path / "a",
        steps=30,
        name="a",
        meta={
            "optimizer": "SGD",
            "test_accuracy": 0.9712,
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0, "dampening": 0}],
        },
    )
    adamw = write_synthetic_run(
        tmp_path / "b",
        steps=30,
        name="b",
        meta={
            "optimizer": "AdamW",
            "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8}],
        },
    )
    text = write_compare([nesterov, adamw], tmp_path / "compare.html").read_text()
    assert "<td>SGD (momentum 0.9, nesterov)</td>" in text and "<td>AdamW (betas 0.9/0.999, wd 0.01)</td>" in text
    assert "<th>stored result</th>" in text and "<td>test accuracy 0.971</td>" in text
    plain = write_compare([adamw], tmp_path / "one.html").read_text()
    assert "stored result" not in plain  # an optional column appears only when a run fills it


def test_logged_metrics_are_stored_charted_and_compared(tmp_path):
    """audit.log(name, value): the values come back as logged, the report charts them, compare overlays and lists them."""
    import torch

    from stepaudit.store import read_metrics

    def run(name: str, scale: float):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def log_odd_steps(step, audit):
            if step % 2 == 1:
                audit.log("val_acc", torch.tensor(scale * step))

        audit = audited_fit(tmp_path / name, model, opt, 3, 6, after_step=log_odd_steps)
        audit.log("val_acc", 0.5, step=2)  # an explicit step overrides that step's value
        with pytest.warns(UserWarning, match="must be a number"):
            audit.log("val_acc", "high")  # never breaks training: a warning, nothing logged
        with pytest.warns(UserWarning, match="got NoneType"):
            audit.log("val_acc", None)
        audit.close()
        return tmp_path / name

    a, b = run("a", 0.1), run("b", 0.2)
    assert read_metrics(a) == {
        "val_acc": ([1, 2, 3, 5], [pytest.approx(0.1), 0.5, pytest.approx(0.3), pytest.approx(0.5)])
    }
    text = render_report(load_run(a))
    drawn = tips(text, "metrics")[0]
    assert drawn["n"] == "val_acc" and drawn["x"] == [1, 2, 3, 5] and drawn["y"] == [0.1, 0.5, 0.3, 0.5]
    compare = write_compare([a, b], tmp_path / "compare.html").read_text()
    assert tips(compare, "c-metric-0")[1]["y"] == [0.2, 0.5, 0.6, 1.0]
    assert "<td>val_acc 0.5 at step 5</td>" in compare and "<td>val_acc 1 at step 5</td>" in compare


def test_every_param_groups_learning_rate_is_recorded_and_charted(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.01}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    audit = audited_fit(tmp_path / "groups", model, opt, 3, 3, after_step=lambda step, audit: scheduler.step())
    audit.close()
    assert [r["lr_group_1"] for r in audit.records] == [0.01, 0.005, 0.0025]
    drawn = tips(render_report(load_run(tmp_path / "groups")), "lr")
    assert [s["n"] for s in drawn] == ["lr, param group 0", "lr, param group 1"]
    assert drawn[0]["y"] == [0.1, 0.05, 0.025] and drawn[1]["y"] == [0.01, 0.005, 0.0025]


def test_a_metric_name_with_markup_is_text_in_the_report_and_compare(tmp_path):
    from stepaudit.store import RunStore

    evil = 'x"/><script>alert(1)</script><g id="'
    run = write_synthetic_run(tmp_path / "evil", steps=30)
    store = RunStore(run)
    store.log_metric(3, evil, 0.5)
    store.close()
    for text in (render_report(load_run(run)), write_compare([run, run], tmp_path / "c.html").read_text()):
        assert "<script>alert(1)</script>" not in text and "alert(1)" in html.unescape(text)


def test_a_verified_run_draws_the_original_and_each_fixed_loss_curve(tmp_path):
    """doctor --verify's stored per-step losses (original, each fix) are the chart's points, and only then is it drawn."""
    from stepaudit.store import RunStore

    original = [[s, 2.3 - 0.001 * s] for s in range(50)]
    fixed = [[s, 2.3 * 0.97**s] for s in range(50)]
    store = RunStore(tmp_path / "verified", {"model": "M", "optimizer": "SGD"})
    for step, loss in original:
        store.append({"step": step, "verdict": "decrease", "loss_before": loss})
    store.update_meta(
        verification_losses={
            "original": original,
            "fixes": [{"code": "lr_too_high", "fix": "lr ×0.1", "verdict": "confirmed", "losses": fixed}],
        }
    )
    store.close()
    text = render_report(load_run(tmp_path / "verified"))
    drawn = tips(text, "verify")
    assert [d["x"] for d in drawn] == [list(range(50))] * 2
    assert drawn[0]["y"] == [g4(v) for _, v in original] and drawn[1]["y"] == [g4(v) for _, v in fixed]
    assert "lr_too_high: lr ×0.1 (confirmed)" in text
    RunStore(tmp_path / "plain", {"model": "M"}).close()
    assert "fig-verify" not in render_report(load_run(tmp_path / "plain"))
