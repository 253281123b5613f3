"""Telling a nested step() from the step by frames: against torch's own hook calls."""

import torch

from stepaudit.nesting import hook_caller, running_below


def test_hooks_of_a_nested_step_see_the_outer_wrapper_below_them():
    """Record each hook call's wrapper frame and whether an earlier one is still running below it."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # SGD.step hooked: the subclass's super().step() nests

    class Inner(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    opt = Inner([p], lr=0.1)
    calls, outer = [], []

    def pre(optimizer, args, kwargs):
        frame = hook_caller(1)
        calls.append(("pre", running_below(outer[0] if outer else None, frame)))
        if not outer:
            outer.append(frame)

    def post(optimizer, args, kwargs):
        frame = hook_caller(1)
        calls.append(("post", frame is outer[0]))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    opt.step()
    assert calls == [("pre", False), ("pre", True), ("post", False), ("post", True)]
    assert not running_below(None, hook_caller(0))


def test_a_finished_frame_is_not_running():
    def remember():
        return hook_caller(0)

    gone = remember()
    assert not running_below(gone, hook_caller(0))
