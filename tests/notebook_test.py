"""Notebooks: a real kernel (nbclient, python3) runs a small notebook; the audit, a loaded run and the
doctor's diagnoses render inline, and the live view is one display updated while training."""

from __future__ import annotations

import html
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TRAIN = """
import torch, stepaudit
from stepaudit.workloads import load_digits, minibatches, mlp, classification_loss
torch.manual_seed(0)
x, y, _, _ = load_digits()
model = mlp((64, 32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
audit = stepaudit.Audit(model, opt, classification_loss, run=RUN)
view = audit.live(interval=0.0)
batches = minibatches(x, y, 32)
for _ in range(25):
    batch = next(batches)
    with audit.watch(batch):
        opt.zero_grad()
        classification_loss(model, batch).backward()
        opt.step()
audit.close()
"""


def run_notebook(tmp_path, cells: list[str]) -> list:
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return book.cells


def html_of(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs if o.get("data"))


def srcdoc(fragment: str) -> str:
    """The document inside the iframe a run renders as."""
    match = re.search(r'<iframe srcdoc="([^"]*)"', fragment)
    assert match, fragment[:300]
    return html.unescape(match.group(1))


def test_a_notebook_renders_the_audit_the_run_and_the_diagnoses_inline(tmp_path):
    cells = run_notebook(
        tmp_path, [f"RUN = {str(tmp_path / 'run')!r}\n" + TRAIN, "audit", "stepaudit.open_run(RUN)", "audit.diagnose()"]
    )
    for cell in cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    live = html_of(cells[0])  # the display was updated in place: one output, its final state
    assert len([o for o in cells[0].outputs if o.output_type == "display_data"]) == 1
    assert "step 24" in live and "of 25 audited steps lowered" in live and "<svg" in live
    audit_doc, run_doc = srcdoc(html_of(cells[1])), srcdoc(html_of(cells[2]))
    for doc in (audit_doc, run_doc):
        assert 'id="fig-loss"' in doc and 'class="kpis"' in doc and "<svg" in doc
        assert "https://" not in doc and "http://" not in doc  # self-contained
    assert 'id="fig-ratio-heatmap"' not in run_doc and 'id="metadata"' not in run_doc  # the main charts only
    cards = srcdoc(html_of(cells[3]))
    assert 'class="finding' in cards and ("healthy" in cards or "severity" in cards)
