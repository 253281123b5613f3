"""The run store: a new run in an old folder, several processes asking for run folders at once, and what
it says about a store it cannot read or a run path it cannot use."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import classification_loss, make_mlp
from support.samples import write_synthetic_run

import stepaudit
from stepaudit.store import RunStore, RunStoreError, new_run_dir, output_file, read_meta, read_run, run_folder


def test_a_new_run_in_an_old_folder_replaces_its_steps_with_a_warning(tiny_batch, tmp_path):
    model = make_mlp()
    with stepaudit.Audit(
        model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, run=tmp_path / "r"
    ) as first:
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


def _damaged(tmp_path, kind: str):
    good = write_synthetic_run(tmp_path / "good", steps=10)
    data = (good / "stepaudit.sqlite").read_bytes()
    run = tmp_path / kind
    run.mkdir()
    content = {
        "truncated": data[:3000],
        "random": bytes(range(256)) * 20,
        "text": b"hello\n",
        "empty": b"",
        "header_only": data[:100],
    }[kind]
    (run / "stepaudit.sqlite").write_bytes(content)
    return run


@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty", "header_only"])
def test_an_unreadable_store_is_one_clear_error_naming_the_file(tmp_path, kind):
    run = _damaged(tmp_path, kind)
    for read in (
        stepaudit.load,
        read_meta,
        read_run,
        lambda r: stepaudit.load(r, "layers"),
        lambda r: stepaudit.load(r / "stepaudit.sqlite"),
    ):
        with pytest.raises(RunStoreError, match="not a stepaudit run store \\(corrupt or truncated\\?\\)") as caught:
            read(run)
        message = str(caught.value)
        assert str(run / "stepaudit.sqlite") in message and "\n" not in message
    assert issubclass(stepaudit.RunStoreError, ValueError)


def test_writing_into_a_corrupt_store_is_the_same_clear_error(tmp_path):
    run = _damaged(tmp_path, "random")
    with pytest.raises(RunStoreError, match="not a stepaudit run store"):
        RunStore(run, meta={})


@pytest.mark.parametrize("inside", ["", "sub"])
def test_a_run_path_on_an_existing_file_names_the_file_and_the_fix(tmp_path, inside):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder; pass a folder for the run") as caught:
        RunStore(tmp_path / "a_file" / inside if inside else tmp_path / "a_file", meta={})
    assert not isinstance(caught.value, FileExistsError)


def test_an_audit_on_an_existing_file_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("x")
    model = make_mlp()
    with pytest.raises(ValueError, match="is a file, not a folder.*run='runs/exp1'"):
        stepaudit.Audit(
            model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, run=tmp_path / "a_file"
        )


def test_the_store_file_names_its_run_folder(tmp_path):
    assert run_folder(tmp_path / "run") == tmp_path / "run"
    assert run_folder(tmp_path / "run" / "stepaudit.sqlite") == tmp_path / "run"


def test_output_file_is_the_path_or_a_default_name_inside_a_folder(tmp_path):
    assert output_file(tmp_path / "r.html", "report.html") == tmp_path / "r.html"
    assert output_file(tmp_path, "report.html") == tmp_path / "report.html"  # an existing folder
    assert output_file(f"{tmp_path}/new/", "report.html") == tmp_path / "new" / "report.html"  # a trailing slash
