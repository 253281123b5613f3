"""The weights do not change, or most of them cannot: no step, lr 0, no gradient, no optimizer, frozen."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..diagnosis import not_training as _not_training
from ..facts import Facts, med
from .base import Code


def params_not_updating(f: Facts) -> Diagnosis | None:
    """No optimizer step, a zero learning rate, or parameters that get no gradient or no optimizer."""
    obs = f.obs
    steps, backwards = f.n_steps, obs.get("backward_passes")
    if f.passive and steps == 0:
        if obs.get("weights_changed"):
            return None  # a hand-written or non-torch.optim update moved the weights: they are updating
        if backwards:
            return Diagnosis(
                "params_not_updating",
                "error",
                0.97,
                0,
                f"{backwards} backward passes ran but optimizer.step() was never called: the weights never change.",
                "call optimizer.step() after loss.backward() (and optimizer.zero_grad() before it)",
            )
        return Diagnosis(
            "params_not_updating",
            "warning",
            0.5,
            None,
            "no backward pass and no optimizer step were seen: nothing was trained.",
            "check that the script reaches its training loop (loss.backward(); optimizer.step())",
        )
    groups = f.param_groups
    zero_lr = [g for g in groups if g.get("lr") == 0]  # passive: the largest lr seen (schedules may end at 0)
    if groups and len(zero_lr) == len(groups):
        return Diagnosis(
            "params_not_updating",
            "error",
            0.95,
            0,
            "the learning rate is 0 in every parameter group.",
            "set a positive learning rate (e.g. lr=1e-3 for Adam, 1e-2–1e-1 for SGD)",
        )
    if f.sampled and not f.moved:
        zero_grad = f.gradient_always_zero
        stale = _stale_optimizer(f) if zero_grad else None
        if stale is not None:
            return stale
        if zero_grad and ((f.loss_form or {}).get("kind") == "constant_loss" or f.dead_output is not None):
            return None  # the loss does not depend on the weights (loss_wiring) or the output is a dead ReLU
        if zero_grad:
            return Diagnosis(
                "params_not_updating",
                "error",
                0.95,
                int(f.sampled[0]["step"]),
                f"the gradient the optimizer received was exactly 0 at all {len(f.sampled)} sampled steps, "
                "so no weight changed: .grad is cleared between backward() and step(), backward() "
                "runs after step(), or the loss reaches no weight (rebuilt from .item() / .detach() / .numpy() "
                "values, so backward() stops at a new leaf).",
                "order each iteration as optimizer.zero_grad(); loss.backward(); optimizer.step(), and compute "
                "the loss from the model's output tensors (no .item(), .detach() or torch.tensor(...) on the way)",
            )
        return Diagnosis(
            "params_not_updating",
            "error",
            0.9,
            int(f.sampled[0]["step"]),
            f"‖Δw‖ = 0 at all {len(f.sampled)} sampled steps although ‖g‖ ≈ {_g(med(r['grad_norm'] for r in f.sampled))}.",
            "check the learning rate and that the optimizer holds the model's parameters",
        )
    return _rare_steps(f) or _mostly_frozen(f) or _partly_not_updating(f, zero_lr, groups)


def _live_orphans(f: Facts) -> list[dict]:
    """Parameters that received a gradient but belong to no optimizer, less the leaves a step creates anew
    (an accumulator such as ``torch.zeros(1, requires_grad=True)``, which no optimizer could keep)."""
    return [
        o
        for o in f.obs.get("orphan_params") or []
        if not (o.get("registered") is False and str(o.get("name")).startswith("a tensor of"))
    ]


def _stale_optimizer(f: Facts) -> Diagnosis | None:
    """The optimizer's own parameters never get a gradient while other parameters do and belong to no optimizer:
    the optimizer was built for a model that was then replaced (a swapped head, a new model per fold)."""
    orphans = _live_orphans(f)
    if not orphans:
        return None
    values = sum(o["numel"] for o in _distinct(orphans))
    return Diagnosis(
        "params_not_updating",
        "error",
        0.95,
        int(f.sampled[0]["step"]),
        f"the optimizer's own parameters never received a gradient (0 at all {len(f.sampled)} sampled steps), "
        f"while {len(orphans)} parameter tensors that do receive gradients ({values:,} values; e.g. "
        f"{_orphan_names(orphans)}) belong to no optimizer: the optimizer holds the parameters of a model that was "
        "replaced or re-created after it was built (a swapped head, a new model per fold), so no weight the "
        "loss uses ever changes.",
        "build the optimizer after the model is final (or pass the new model's parameters to it), e.g. "
        "optimizer = torch.optim.Adam(model.parameters()) after the last model = ... / model.fc = ...",
        kind="stale_optimizer",
    )


def _orphan_names(orphans: list[dict], n: int = 3) -> str:
    """The first ``n`` distinct names of the orphans that still have one ("?": no longer the model's)."""
    named = list(dict.fromkeys(str(o["name"]) for o in orphans if o["name"] != "?"))
    return ", ".join(named[:n]) or "unnamed tensors"


def _distinct(orphans: list[dict]) -> list[dict]:
    """One entry per (name, size): a tensor re-created at every step (a layer built in forward()) counts once."""
    return list({(o["name"], o["numel"]): o for o in orphans}.values())


def _recreated(orphans: list[dict]) -> int:
    """How many times the most repeated unnamed orphan was seen anew: parameters seen with a gradient that are
    no longer the model's (name "?") and come back with the same size are re-created between steps."""
    sizes = [o["numel"] for o in orphans if o.get("name") == "?" and o.get("registered") is not False]
    return max((sizes.count(n) for n in set(sizes)), default=0)


def _rare_steps(f: Facts) -> Diagnosis | None:
    """optimizer.step() once every many backward passes (outside the batch loop), on a run that stalls."""
    passes = [r.get("backward_passes") for r in f.records if isinstance(r.get("backward_passes"), (int, float))]
    # Deliberate accumulation (nanoGPT: 40 micro-batches) has the same ratio; only a run that does not
    # learn makes it a suspect, and then as a warning that names both readings.
    if not passes or f.n_steps > 50 or not _not_training(f):
        return None
    every = sorted(passes)[len(passes) // 2]
    if every < 8:  # deliberate accumulation is usually 2-8 micro-batches, and over a long run
        return None
    total = sum(passes)
    return Diagnosis(
        "params_not_updating",
        "warning",
        0.7,
        0,
        f"optimizer.step() ran {f.n_steps} times for {total} backward passes (once every {every}) and the "
        f"loss barely moved: {_between_steps(f, every)}, and the weights change {every}× less often than the "
        "script sees batches (deliberate gradient accumulation, zero_grad() only after each step, does this "
        "too; then ignore this).",
        "call optimizer.zero_grad(), loss.backward() and optimizer.step() once per batch, inside the "
        "batch loop (check the indentation of optimizer.step())",
        kind="rare_steps",
    )


def _between_steps(f: Facts, every: int) -> str:
    """What the gradient applied at each step holds, as far as the zeroing checks tell (see missing_zero_grad):
    cleared before the next backward began, or still there (nothing clears it, so the batches add up)."""
    checks = [c for c in f.obs.get("zero_checks") or [] if isinstance(c.get("kept"), (int, float))]
    if checks and sum(c["kept"] < 0.5 for c in checks) >= 0.9 * len(checks):
        return (
            f".grad was cleared before the first backward() after each of {len(checks)} checked steps: if "
            f"zero_grad() runs in the batch loop, each update applies only the last batch's gradient and the "
            f"other {every - 1} batches' gradients are computed and thrown away"
        )
    if checks and sum(c["kept"] >= 0.5 for c in checks) >= 0.9 * len(checks):
        return f".grad is never cleared between steps, so each update sums the gradients of {every} batches"
    return (
        f"each update applies the sum of {every} batches' gradients, or only the last batch's if zero_grad() "
        "runs in the batch loop"
    )


def _mostly_frozen(f: Facts) -> Diagnosis | None:
    """Most of the model has requires_grad=False and the run does not learn."""
    total, frozen = f.obs.get("model_numel") or 0, f.obs.get("frozen_numel") or 0
    if not total or frozen < 0.5 * total or not _not_training(f):
        return None
    names = ", ".join(f.obs.get("frozen_names") or [])
    return Diagnosis(
        "params_not_updating",
        "error" if frozen >= 0.9 * total else "warning",
        _clip(0.5 + 0.4 * frozen / total),
        0,
        f"{frozen / total:.0%} of the model's values ({frozen:,} of {total:,}; e.g. {names}) have "
        "requires_grad=False, and the loss barely moved: only the rest can learn.",
        "unfreeze the layers that must learn (p.requires_grad_(True)); freeze only pretrained layers",
        kind="frozen",
    )


def _zero_lr_note(f: Facts, zero_lr: list, groups: list) -> Diagnosis | None:
    """Some groups with lr=0 while the others learn, on a loss that falls: a frozen-by-lr layer, likely on purpose.

    Weighed by the groups' share of the optimizers' values; lr=0 over (nearly) everything, or a loss that
    does not fall, stays with the error of ``_partly_not_updating``.
    """
    share = _numel_share(zero_lr, groups)
    if not zero_lr or share >= 0.9 or f.progress is None or _not_training(f) or f.first_nonfinite is not None:
        return None
    which = _groups_named(f, zero_lr)
    owner = "optimizers'" if _several_optimizers(f) else "optimizer's"
    return Diagnosis(
        "params_not_updating",
        "info",
        _clip(0.5 + 0.4 * share),
        0,
        f"parameter {which} lr=0 ({_percent(share)} of the {owner} values), so those weights never change; the "
        "other groups learn and the loss falls.",
        f"parameter {which} lr=0; if that is intended (a layer frozen by its learning rate) ignore this, "
        "otherwise give it a positive learning rate",
        kind="zero_lr_group",
    )


def _percent(share: float) -> str:
    """A share as a percentage; a nonzero share below 0.5% is "<1%", never "0%"."""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def _several_optimizers(f: Facts) -> bool:
    """The groups come from more than one optimizer (passive: each group carries its optimizer under ``opt``)."""
    return len({id(g.get("opt")) for g in f.param_groups}) > 1


def _groups_named(f: Facts, part: list) -> str:
    """ "group 1 has" / "groups 0, 2 have"; with several optimizers each group names its optimizer's index."""
    several = _several_optimizers(f)
    names = [
        f"{_group_index(f, g)} of optimizer {(g.get('opt') or {}).get('index', '?')}"
        if several
        else str(_group_index(f, g))
        for g in part
    ]
    return f"group {names[0]} has" if len(part) == 1 else f"groups {', '.join(names)} have"


def _group_index(f: Facts, group: dict) -> int:
    """A group's position in its own optimizer's ``param_groups``."""
    same = [g for g in f.param_groups if g.get("opt") is group.get("opt")]
    return next(i for i, g in enumerate(same) if g is group)


def _numel_share(part: list, groups: list) -> float:
    """The share of the groups' values in ``part`` (by count of groups where the sizes are unknown)."""
    total = sum(g.get("n_params") or 0 for g in groups)
    if not total:
        return len(part) / len(groups) if groups else 0.0
    return sum(g.get("n_params") or 0 for g in part) / total


def _partly_not_updating(f: Facts, zero_lr: list, groups: list) -> Diagnosis | None:
    note = _zero_lr_note(f, zero_lr, groups)
    if note is not None:
        return _partly_not_updating(f, [], groups) or note
    obs = f.obs
    trainable = obs.get("trainable_numel") or 0
    orphans = obs.get("orphan_params") or []
    recreated = _recreated(orphans)
    orphan_numel = sum(o["numel"] for o in _distinct(orphans))
    no_grad = [p for o in obs.get("optimizers") or [] for p in o.get("no_grad") or []]
    no_grad_numel = sum(o.get("no_grad_numel", 0) for o in obs.get("optimizers") or [])
    held = sum(o.get("numel", 0) for o in obs.get("optimizers") or [])
    parts, share = [], 0.0
    if orphans:
        share = max(share, min(1.0, orphan_numel / trainable) if trainable else 1.0)
        if recreated >= 2:
            parts.append(
                f"{len(_distinct(orphans))} distinct parameter tensors ({orphan_numel:,} values, {_percent(share)} "
                f"of the model's trainable values) receive gradients but belong to no optimizer, and are new "
                f"objects at later steps (up to {recreated} copies of the same size): a layer created inside "
                "forward() (or re-created in the training loop) starts from fresh random weights each time and "
                "never learns"
            )
        else:
            parts.append(
                f"{len(orphans)} parameter tensors ({orphan_numel:,} values, {_percent(share)} of the model's "
                f"trainable values; e.g. {_orphan_names(orphans)}) receive gradients but belong to no "
                "optimizer, so they never change"
            )
    if no_grad_numel and held:
        s = no_grad_numel / held
        share = max(share, s)
        parts.append(
            f"{len(no_grad)} of the optimizer's parameter tensors ({s:.0%} of its values; e.g. "
            f"{', '.join(p['name'] for p in no_grad[:3])}) never received a nonzero gradient (detached or unused)"
        )
    if zero_lr:
        share = max(share, _numel_share(zero_lr, groups))
        parts.append(f"{len(zero_lr)} of {len(groups)} parameter groups have lr = 0")
    if not parts:
        return None
    severity = "error" if share >= 0.5 or orphans else "warning"
    kind = "no_grad" if not orphans and not zero_lr else "structure"
    fresh = orphans and all(
        o.get("registered") is False and str(o.get("name")).startswith("a tensor of") for o in orphans
    )
    if fresh and not no_grad_numel and not zero_lr and share < 0.5 and f.learning_well:
        # leaves created anew at every step (an accumulator such as loss = torch.zeros(1, requires_grad=True)):
        # no optimizer could keep them across steps, so they are not weights the model needs, and the run learnt
        severity = "info"
        parts[-1] += "; they are created anew at every step and the model learns, so they are likely not weights"
    if kind == "no_grad" and share < 0.5 and f.learning_well:
        # the rest of the model learns: a head this loss never uses, or a bias that cancels (a Siamese distance
        # ‖f(a) − f(b)‖ takes none from the last layer's bias) is no fault; a detached encoder holds most values
        severity = "info"
        parts[-1] += "; the rest of the model learns, so these are likely parts this loss does not use"
    fix = (
        "build the optimizer after the model is final (after replacing layers / moving to the device) "
        "from model.parameters(); don't detach() or wrap the forward in torch.no_grad()"
    )
    if recreated >= 2:
        fix = (
            "create layers in __init__ (self.out = nn.Linear(...)), not inside forward(), so the same weights "
            "are used at every step; then build the optimizer from model.parameters()"
        )
    elif any(o.get("registered") is False for o in orphans):
        fix = (
            "register every layer with the model: keep submodules in nn.ModuleList / nn.ModuleDict, not a plain "
            "list or dict, and create weights once in __init__ as nn.Parameter, not inside forward(); then "
            "build the optimizer from model.parameters()"
        )
    return Diagnosis(
        "params_not_updating", severity, _clip(0.6 + 0.4 * share), 0, "; ".join(parts) + ".", fix, kind=kind
    )


CODE = Code(
    name="params_not_updating",
    rule=params_not_updating,
    priority=10,
    causes=("lr_too_low", "labels_unlearnable", "gradient_noise_dominates", "vanishing_gradients"),
)
