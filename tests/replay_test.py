"""Replay: which random state each micro-batch's re-evaluation starts from, and host-generator tracking."""

from __future__ import annotations

import random

import torch

from stepaudit import state
from stepaudit.replay import CHECK_EVERY, Replay


def test_micro_batches_start_at_the_last_mark_before_their_first_forward():
    f, m = "forward", "mark"
    per_micro_batch = [(f, "f0"), (m, "m0"), (f, "f1"), (m, "m1"), (f, "f2"), (m, "m2")]
    assert Replay.states("entry", per_micro_batch, 1) == ["entry"]
    assert Replay.states("entry", per_micro_batch, 3) == ["entry", "m0", "m1"]
    r_drop = [(f, "a0"), (f, "b0"), (m, "x0"), (m, "y0"), (f, "a1"), (f, "b1"), (m, "x1"), (m, "y1")]
    assert Replay.states("entry", r_drop, 2) == ["entry", "y0"]  # two model calls per micro-batch
    one_backward = [(f, "f0"), (f, "f1"), (f, "f2"), (m, "m2"), (m, "m1"), (m, "m0")]
    assert Replay.states("entry", one_backward, 3) == ["entry", "f0", "f1"]  # no mark in between
    assert Replay.states("entry", [(f, "f0")], 3) == ["entry", None, None]


def test_a_mark_is_taken_when_the_backward_reaches_the_output_and_leaves_are_not_hooked():
    weight = torch.ones(3, requires_grad=True)
    output, events, handles = weight * 2, [], []
    Replay.record_forward((weight.detach(), weight, output), events, handles, devices=[], host=False)
    assert len(handles) == 1  # the non-leaf output, not the detached tensor nor the parameter itself
    torch.rand(5)  # a draw after the forward, before the backward (a loss_fn's own noise)
    expected = torch.get_rng_state()
    output.sum().backward()
    assert [kind for kind, _ in events] == ["forward", "mark"] and torch.equal(events[1][1].cpu, expected)
    handles[0].remove()
    assert not weight._backward_hooks


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


def test_forwards_without_a_backward_stay_inside_their_micro_batch():
    f, m = "forward", "mark"
    detached_targets_first = [(f, "t"), (f, "f0"), (m, "m0"), (f, "f1"), (m, "m1")]
    assert Replay.states("entry", detached_targets_first, 2) == ["entry", "m0"]
    accuracy_check_after_first = [(f, "f0"), (m, "m0"), (f, "acc"), (f, "f1"), (m, "m1"), (f, "f2"), (m, "m2")]
    assert Replay.states("entry", accuracy_check_after_first, 3) == ["entry", "m0", "m1"]


def test_a_mark_waits_for_the_end_of_its_backward():
    weight = torch.ones(3, requires_grad=True)
    output, events, handles = weight * 2, [], []
    Replay.record_forward(output, events, handles, devices=[], host=False)
    weight.register_hook(lambda grad: torch.rand(1) and None)  # a draw later in the same backward
    output.sum().backward()
    assert torch.equal(events[-1][1].cpu, torch.get_rng_state())  # noted after that draw
    handles[0].remove()
