"""Replay: which random state each micro-batch's re-evaluation starts from, and host-generator tracking."""
from __future__ import annotations

import random

import torch

from stepaudit import state
from stepaudit.replay import CHECK_EVERY, Replay


def test_micro_batches_split_the_marks_evenly():
    entry, marks = "entry", [f"m{i}" for i in range(6)]
    assert Replay.states(entry, marks, 1) == ["entry"]
    assert Replay.states(entry, marks, 3) == ["entry", "m1", "m3"]  # two outputs per micro-batch (R-Drop)
    assert Replay.states(entry, marks[:2], 3) == ["entry", "m0", "m1"]
    assert Replay.states(entry, [], 3) == ["entry", None, None]  # outputs without grad: nothing to replay


def test_a_mark_is_taken_when_the_backward_reaches_the_output():
    weight = torch.ones(3, requires_grad=True)
    output, marks = weight * 2, []
    Replay.mark_output(output, marks, limit=4, devices=[], host=False)
    torch.rand(5)  # a draw after the forward, before the backward (a loss_fn's own noise)
    expected = torch.get_rng_state()
    output.sum().backward()
    assert len(marks) == 1 and torch.equal(marks[0].cpu, expected)
    Replay.mark_output(weight.detach() * 2, marks, limit=4, devices=[], host=False)  # no grad: no hook
    assert len(marks) == 1


def test_host_generators_are_tracked_only_after_a_draw_and_the_count_is_released():
    replay = Replay()
    quiet = replay.open([])
    assert quiet.host is not None  # the first opened step checks
    replay.check(quiet)
    assert not replay.tracking_host and quiet.host is None  # no draw: snapshots dropped
    assert replay.open([]).host is None  # and later steps skip them ...
    for _ in range(CHECK_EVERY - 2):
        replay.open([])
    drawing = replay.open([])  # ... until the next periodic check
    assert drawing.host is not None
    random.random()
    replay.check(drawing)
    assert replay.tracking_host and state._HOST_TRACKERS[0] >= 1
    before = state._HOST_TRACKERS[0]
    replay.close()
    assert not replay.tracking_host and state._HOST_TRACKERS[0] == before - 1
