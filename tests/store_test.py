"""The run store: a new run in an old folder, and several processes asking for run folders at once."""
from __future__ import annotations

import threading

import pytest
import torch

import stepaudit
from conftest import classification_loss, make_mlp
from stepaudit.store import new_run_dir


def test_a_new_run_in_an_old_folder_replaces_its_steps_with_a_warning(tiny_batch, tmp_path):
    model = make_mlp()
    with stepaudit.Audit(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                         run=tmp_path / "r") as first:
        for _ in range(5):
            first.step(tiny_batch)
    with pytest.warns(UserWarning, match="held 5 steps of an earlier run"):
        second = stepaudit.Audit(model, torch.optim.Adam(model.parameters()), classification_loss, run=tmp_path / "r")
    with second:
        for _ in range(2):
            second.step(tiny_batch)
    rows = stepaudit.load(tmp_path / "r")
    steps = list(rows["step"]) if hasattr(rows, "columns") else [r["step"] for r in rows]
    assert steps == [0, 1]
    assert second.store_meta()["optimizer"] == "Adam"


def test_concurrent_new_run_dirs_are_distinct(tmp_path):
    barrier, made, errors = threading.Barrier(8), [], []

    def ask():
        barrier.wait()
        try:
            made.append(new_run_dir(tmp_path, name="exp"))
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(made)) == 8 and all(path.is_dir() for path in made)
