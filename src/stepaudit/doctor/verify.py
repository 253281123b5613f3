"""``stepaudit doctor --verify``: re-run the script with a diagnosis's fix applied by hooks, and judge it.

For each of the top diagnoses (at most three) with an automatic counterfactual (``counterfactual.py``),
the unchanged script runs again from the start in a fresh process (``python -m stepaudit.doctor.verify``,
the child entry below) for the same number of optimizer steps, with the fix installed by global hooks.
The original is re-run once the same way, unchanged, to measure its run-to-run noise.

The outcome of a run is its last loss (the doctor's own: median of the last fifth of the per-step
losses; infinite once a non-finite value appeared), in units of the starting loss: the smaller of the
original's and the fixed run's starting losses (they are equal unless the fix changes the first forward,
as standardising the inputs does, and then the lower start is the fair unit). With ``gain`` = the
original's last loss − the fixed run's and ``noise`` = |the original's − its re-run's|, in that unit:

- **confirmed**: ``gain ≥ max(MARKED, NOISE_TIMES × noise)`` (markedly better, beyond the noise) and the
  fixed run trains: its last loss is at least ``MARKED`` of its start below its start, and not at the loss
  of predicting the label frequencies (the doctor's "stuck at the prior");
- **inconclusive**: the run failed; or ``gain > 0`` but the noise is too large to tell (``NOISE_TIMES ×
  noise ≥ MARKED``); or better beyond the noise but not markedly (``max(SLIGHT, NOISE_TIMES × noise) ≤
  gain < MARKED``: the fix helped, by less than a fix must); or markedly better than the original but the
  fixed run did not train either;
- **refuted**: otherwise (no better, or better by less than ``SLIGHT``); a refuted diagnosis is demoted
  below the confirmed ones.

A learning-rate fix tries its second factor when the first is not confirmed and keeps the better run.

A rewired loss (``loss_wiring``) is another objective than the script's (NLL of raw scores is unbounded
below, cross-entropy is not), so the re-run of the original is made observe-only: it trains unchanged
while the hooks measure the rewired loss of each training call, and the fixed run is judged against the
original measured that way (with the noise of the original's own loss). A counterfactual that counts its
changes (loss rewiring, the schedule hold, re-initialisation) and changed nothing makes the verification
inconclusive, never refuted. The diagnosing run's facts pick the fix of a diagnosis's kind (the schedule
hold for ``lr_too_low`` of kind "schedule"; no check for a ``loss_wiring`` kind no rewiring fixes).

Each child runs in a scratch folder that mirrors the working folder (a symbolic link per entry); a file
the script opens for writing there is made the run's own first (an appended or updated file is copied,
a linked folder on the way becomes a real folder of links), so checkpoints and logs are written into the
scratch copy (``torch.save``, which writes from C++, gets the same; other C-level writers, such as sqlite3
or h5py, are not seen). A write that would reach the user's working folder or the script's folder by
another path is refused (``PermissionError``) and the run is reported as failed.

Size (over 400 lines): the parent (runs, judgement, the report's lines) and the child entry share the run
protocol and the scratch-folder rules; the counterfactuals themselves live in ``counterfactual*.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .counterfactual import COUNTERFACTUALS, REPORTING
from .counterfactual_wiring import BATCH_AXIS

MARKED = 0.10  # share of the starting loss the fix must remove beyond the original's, at least
SLIGHT = MARKED / 2  # below this gain a fix counts as no help at all (refuted); up to MARKED it is inconclusive
NOISE_TIMES = 3.0  # the margin in units of the original's run-to-run noise
TOP = 3  # diagnoses verified, at most
_FINAL = re.compile(r"\bfinal_metric\s+\w+\s+(-?\d*\.?\d+(?:e[-+]?\d+)?)", re.IGNORECASE)  # the doctor suite's own line
_METRIC = re.compile(
    r"\b(?:val(?:idation)?|test|eval)?[_ ]?acc(?:uracy)?\b\s*[:=]?\s*(\d*\.?\d+)\s*(%?)", re.IGNORECASE
)


@dataclass
class RunLoss:
    """What one run's loss did: start and last loss, a non-finite value, steps, failure, printed metric."""

    start: float | None
    end: float | None
    nonfinite: bool = False
    steps: int = 0
    error: str | None = None
    seconds: float = 0.0
    metric: float | None = None
    at_prior: bool = False  # the last loss sits at the loss of predicting the label frequencies
    losses: list | None = None  # [step, loss] of every finite loss before the first non-finite step
    applied: dict | None = None  # what a reporting counterfactual changed, by name (None: not counted)
    shadow: dict | None = None  # observe-only loss_wiring run: the original measured with the rewired loss

    def level(self, unit: float) -> float | None:
        """Last loss in units of ``unit`` (infinite after a non-finite value); None without a loss."""
        if self.nonfinite and self.start is not None:
            return math.inf
        return None if self.end is None else self.end / unit

    def shown(self) -> str:
        """``2.30 → 0.12`` (``→ non-finite`` after a divergence)."""
        start = "n/a" if self.start is None else f"{self.start:.3g}"
        return f"{start} → {'non-finite' if self.nonfinite else 'n/a' if self.end is None else f'{self.end:.3g}'}"


def from_facts(
    facts, steps: int, error: str | None = None, seconds: float = 0.0, metric: float | None = None
) -> RunLoss:
    """The ``RunLoss`` of a watched run, measured as the doctor measures it (``Facts``)."""
    return RunLoss(
        facts.loss_start,
        facts.loss_end,
        facts.first_nonfinite is not None,
        steps,
        error,
        seconds,
        metric,
        bool(facts.stuck_at_prior),
        [[int(s), float(v)] for s, v in facts.losses],
    )


def printed_metric(text: str) -> float | None:
    """The script's last ``final_metric NAME VALUE`` line, else the last accuracy it printed (``acc 0.93``,
    ``val_accuracy: 93%``, as a fraction); else None."""
    final = _FINAL.findall(text or "")
    if final:
        return float(final[-1])
    found = _METRIC.findall(text or "")
    if not found:
        return None
    value, percent = found[-1]
    number = float(value)
    return number / 100 if percent or number > 1 else number


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_child(
    script: str | os.PathLike,
    args: list[str],
    steps: int | None,
    time_limit: float | None = None,
    fix: str | None = None,
    factor: float | None = None,
    timeout: float = 600.0,
) -> RunLoss:
    """Run the script in a fresh process for ``steps`` optimizer steps (None: to its end), with ``fix``."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepaudit-verify-") as scratch:
        out, work = Path(scratch) / "result.json", Path(scratch) / "work"
        _mirror(Path.cwd(), work)
        command = [
            sys.executable,
            "-m",
            "stepaudit.doctor.verify",
            "--out",
            str(out),
            "--max-steps",
            str(steps or 0),
            "--protect",
            str(Path.cwd()),
        ]
        command += ["--fix", fix] if fix else []
        command += ["--factor", repr(factor)] if factor is not None else []
        command += ["--time-limit", repr(time_limit)] if time_limit is not None else []
        process = subprocess.Popen(
            [*command, "--", str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            errors="replace",
            cwd=work,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return RunLoss(None, None, error=f"timed out after {timeout:.0f} s", seconds=time.monotonic() - started)
        except BaseException:  # Ctrl-C: no child is left behind
            process.kill()
            process.communicate()
            raise
        seconds = time.monotonic() - started
        if not out.is_file():
            return RunLoss(None, None, error=f"exit status {process.returncode}: {_last_line(stderr)}", seconds=seconds)
        found = json.loads(out.read_text())
    return RunLoss(
        found["start"],
        found["end"],
        found["nonfinite"],
        found["steps"],
        found["error"],
        seconds,
        printed_metric(stdout),
        found["at_prior"],
        found.get("losses"),
        found.get("applied"),
        found.get("shadow"),
    )


def _gain(original: RunLoss, fixed: RunLoss) -> float | None:
    """How much lower the fixed run's last loss is, in units of the smaller starting loss; None if unknown."""
    starts = [abs(run.start) for run in (original, fixed) if run.start]
    if not starts:
        return None
    o, f = original.level(min(starts)), fixed.level(min(starts))
    return None if o is None or f is None else (0.0 if o == f else o - f)


def _trains(run: RunLoss) -> bool:
    """The run's last loss is at least ``MARKED`` of its start below its start, finite, not at the label prior."""
    return (
        not run.nonfinite
        and not run.at_prior
        and run.start is not None
        and run.end is not None
        and run.start != 0
        and (run.start - run.end) / abs(run.start) >= MARKED
    )


def _noise(original: RunLoss, rerun: RunLoss) -> float | None:
    """|the original's last loss − its re-run's| in units of the smaller start (0 when identical); None if unknown."""
    if rerun.error is not None and original.error is None:
        return None
    if original.start is not None and (original.start, original.end, original.nonfinite) == (
        rerun.start,
        rerun.end,
        rerun.nonfinite,
    ):
        return 0.0
    drift = _gain(original, rerun)
    return None if drift is None else abs(drift)


def judge(original: RunLoss, rerun: RunLoss, fixed: RunLoss) -> tuple[str, float | None]:
    """(verdict, noise) of a fixed run against the original and its unchanged re-run."""
    return judge_noise(original, fixed, _noise(original, rerun))


def judge_noise(original: RunLoss, fixed: RunLoss, noise: float | None) -> tuple[str, float | None]:
    """(verdict, noise) of a fixed run against the original, given the original's run-to-run noise."""
    failed = fixed.error is not None and original.error is None
    gain = None if failed else _gain(original, fixed)
    if gain is None:
        return "inconclusive", None
    if noise is None or math.isnan(noise) or math.isnan(gain):
        return "inconclusive", noise
    if gain >= max(MARKED, NOISE_TIMES * noise):
        return ("confirmed" if _trains(fixed) else "inconclusive"), noise
    if gain > 0 and NOISE_TIMES * noise >= MARKED:
        return "inconclusive", noise
    if gain >= max(SLIGHT, NOISE_TIMES * noise):
        return "inconclusive", noise  # better beyond the noise, but not markedly
    return "refuted", noise


def _detail(verdict: str, fix: str, original: RunLoss, rerun: RunLoss, fixed: RunLoss, noise: float | None) -> str:
    """The verification line, e.g. ``confirmed: with lr ×0.1 the loss fell 2.30 → 0.12 (original 2.30 → 2.29)``."""
    if fixed.error is not None and original.error is None:
        return f"inconclusive: the verification run failed: {fixed.error}"
    if rerun.error is not None and original.error is None:
        return f"inconclusive: the re-run of the original (for its noise) failed: {rerun.error}"
    if _gain(original, fixed) is None:
        return f"inconclusive: no loss to compare (with {fix}: {fixed.shown()}; original {original.shown()})"
    went = (
        "fell"
        if not fixed.nonfinite and fixed.end is not None and fixed.start is not None and fixed.end < fixed.start
        else "went"
    )
    text = f"{verdict}: with {fix} the loss {went} {fixed.shown()} (original {original.shown()})"
    if rerun.metric is not None and fixed.metric is not None:
        text += f"; the script's printed metric {fixed.metric:.3g} (original {rerun.metric:.3g})"
    gain = _gain(original, fixed)
    slight = (
        gain is not None
        and 0 < gain < MARKED
        and noise is not None
        and math.isfinite(noise)
        and NOISE_TIMES * noise < MARKED
    )
    if verdict == "inconclusive" and slight:
        return (
            text
            + f": better than the original by {_share(gain)} of its starting loss, less than the {MARKED:.0%} a fix must remove"
        )
    if verdict == "inconclusive" and not _trains(fixed):
        return text + ": better than the original, but that run did not train either"
    if verdict == "inconclusive":
        if noise is not None and math.isfinite(noise):
            return (
                text + f", but the original's run-to-run noise ({noise:.2g} of its starting loss) is too large to tell"
            )
        return text + ", and the original's re-run differs too much to tell"
    if verdict == "refuted" and gain is not None and gain > 0:
        return (
            text + f": only {_share(gain)} of its starting loss lower, under the {MARKED:.0%} a fix must remove, so "
            "no better than the original"
        )
    if verdict == "refuted":
        return text + ": no better than the original"
    return text


def _share(x: float) -> str:
    """A share as a percentage; a nonzero one under 0.5% is "<1%", never "0%"."""
    return "<1%" if 0 < x < 0.005 else f"{x:.0%}"


def _unchecked(code: str, why: str = "") -> dict:
    return {
        "fix": None,
        "verdict": "no automatic check",
        "loss_original": None,
        "loss_fixed": None,
        "metric_original": None,
        "metric_fixed": None,
        "steps": 0,
        "seconds": 0.0,
        "detail": f"no automatic check: stepaudit has no hook that applies the fix for {code}{why}",
    }


REWIRABLE = (
    "probabilities_into_cross_entropy",
    "scores_into_nll_loss",
    "probabilities_into_bce_with_logits",
    "softmax_over_batch",
    "broadcast_shapes",
)  # loss_wiring kinds the rewiring counterfactual fixes


def counterfactual_for(diagnosis: dict, facts=None) -> tuple[str | None, str]:
    """(the counterfactual's key, or None; why none) for a diagnosis, its kind read again from ``facts``."""
    code = diagnosis["code"]
    if facts is not None and code == "lr_too_low":
        from .codes.lr_too_low import schedule_collapse

        if schedule_collapse(facts) is not None:
            return "lr_schedule_collapse", ""
    if facts is not None and code == "loss_wiring":
        from .codes.loss_wiring import loss_wiring

        found = loss_wiring(facts)
        if found is not None and found.kind not in REWIRABLE:
            return None, f" ({found.kind.replace('_', ' ')})"
    if facts is not None and code == "params_not_updating":
        why = _not_addable(facts)
        if why:
            return None, f" ({why})"
    return (code, "") if code in COUNTERFACTUALS else (None, "")


def _not_addable(facts) -> str:
    """Why adding the missing parameters to the optimizer is not this run's fix ('' when it is)."""
    orphans = facts.obs.get("orphan_params") or []
    if not orphans:
        return "no parameters held by no optimizer: the fix is not to add any"
    # "?": a parameter with a gradient that is no longer among the model's (replaced, e.g. re-created in
    # forward); "created during the forward pass": a fresh leaf each call. Neither survives to the next step.
    if any(o.get("name") == "?" or "created during the forward pass" in str(o.get("name")) for o in orphans):
        return "parameters re-created during training: adding them to the optimizer changes nothing"
    return ""


def split_curves(diagnoses: list[dict]) -> dict | None:
    """Take the verifications' per-step loss curves out: {"original": […], "fixes": [… its own "original" if measured]}."""
    found: dict = {"original": None, "fixes": []}
    for d in diagnoses:
        v = d.get("verification") or {}
        original, fixed = v.pop("losses_original", None), v.pop("losses_fixed", None)
        measured = v.get("original_measured_with") is not None
        found["original"] = found["original"] or (None if measured else original)
        if fixed is not None:
            found["fixes"].append(
                {
                    "code": d["code"],
                    "fix": v.get("fix"),
                    "verdict": v.get("verdict"),
                    "losses": fixed,
                    **({"original": original} if measured else {}),
                }
            )
    return found if found["fixes"] else None


def _verification(
    code: str,
    fix: str,
    verdict: str,
    detail: str,
    original: RunLoss,
    fixed: RunLoss,
    rerun: RunLoss,
    noise: float | None,
    seconds: float,
) -> dict:
    return {
        "fix": fix,
        "verdict": verdict,
        "loss_original": {"start": original.start, "end": original.end, "nonfinite": original.nonfinite},
        "loss_fixed": {"start": fixed.start, "end": fixed.end, "nonfinite": fixed.nonfinite},
        "metric_original": rerun.metric,
        "metric_fixed": fixed.metric,
        "steps": fixed.steps,
        "seconds": round(seconds, 2),
        "noise": noise,
        "detail": detail,
        "losses_original": original.losses,
        "losses_fixed": fixed.losses,
        **({"original_measured_with": "the rewired loss"} if isinstance(original, _Measured) else {}),
    }


def verify_one(
    code: str,
    script,
    args: list[str],
    steps: int | None,
    original: RunLoss,
    rerun: RunLoss,
    time_limit: float | None,
    timeout: float,
) -> dict:
    """Run ``code``'s counterfactual (each factor in turn until one is confirmed) and judge the best run."""
    counterfactual = COUNTERFACTUALS[code]
    best = None
    seconds = 0.0
    measured = _measured(original, rerun) if code == "loss_wiring" else None
    if measured is not None:  # the rewired loss is another objective: the original is measured with it too
        original = measured
    for factor in counterfactual.factors:
        fixed = run_child(script, args, steps, time_limit, code, factor, timeout)
        seconds += fixed.seconds
        verdict, noise = (
            judge(original, rerun, fixed) if measured is None else judge_noise(original, fixed, measured.noise)
        )
        candidate = (verdict, noise, fixed, counterfactual.label(factor))
        gains = [_gain(original, run) for run in (fixed, best[2])] if best is not None else [None, None]
        better = (
            best is None or gains[1] is None or (fixed.error is None and gains[0] is not None and gains[0] > gains[1])
        )
        best = candidate if better else best
        if verdict == "confirmed" or fixed.error is not None or fixed.applied == {}:  # {}: nothing to change
            break
    verdict, noise, fixed, fix = best
    if fixed.applied:
        fix += " (" + "; ".join(f"{name} ×{count}" for name, count in sorted(fixed.applied.items())) + ")"
    detail = _detail(verdict, fix, original, rerun, fixed, noise)
    if fixed.applied == {} and fixed.error is None:  # counted, and nothing was changed: the same run again
        verdict = "inconclusive"
        detail = f"inconclusive: {fix}: the hooks found nothing to change in this run (original {original.shown()})"
    elif measured is not None:
        detail = detail.replace("(original ", "(original, measured with the rewired loss, ", 1)
    elif (fixed.applied or {}).get(BATCH_AXIS):  # the fixed run trains another objective, measured on its own
        detail = detail.replace("(original ", "(original, on its own loss over the batch axis, ", 1)
    return _verification(code, fix, verdict, detail, original, fixed, rerun, noise, seconds)


@dataclass
class _Measured(RunLoss):
    """The original run measured with the rewired loss (an observe-only re-run), and the original's noise."""

    noise: float | None = None


def _measured(original: RunLoss, rerun: RunLoss) -> _Measured | None:
    """The original as the observe-only re-run measured it with the rewired loss; None without such values."""
    shadow = rerun.shadow or {}
    if rerun.error is not None or shadow.get("start") is None:
        return None
    return _Measured(
        shadow["start"],
        shadow.get("end"),
        bool(shadow.get("nonfinite")),
        rerun.steps,
        None,
        rerun.seconds,
        rerun.metric,
        False,
        shadow.get("losses"),
        None,
        None,
        _noise(original, rerun),
    )


def _shadow_summary(values: list[float], batch_size: int | None) -> dict | None:
    """Start, last loss (the doctor's rules) and curve of the rewired loss measured at each training call."""
    from . import summary

    finite = []
    for v in values:
        if not math.isfinite(v):
            break
        finite.append(v)
    if not finite:
        return None
    start = finite[0] if (batch_size or 0) >= 16 else statistics.median(finite[: summary.smoothing(batch_size)])
    return {
        "start": start,
        "end": summary.loss_end(finite, batch_size),
        "nonfinite": len(finite) < len(values),
        "losses": [[i, v] for i, v in enumerate(finite)],
    }


def verify(
    diagnoses: list[dict],
    script,
    args: list[str],
    steps: int | None,
    time_limit: float | None = None,
    original: RunLoss | None = None,
    timeout: float | None = None,
    facts=None,
) -> list[dict]:
    """Add ``verification`` to each of the top ``TOP`` diagnoses and put the confirmed ones first.

    Each run stops after ``steps`` optimizer steps (None: at the script's own end) or ``time_limit``
    seconds; ``original`` is the diagnosing run's ``RunLoss`` (None: run it here, in a child, too);
    ``facts`` (the diagnosing run's) picks the counterfactual of a diagnosis's kind.
    """
    chosen = [d for d in diagnoses[:TOP] if d["code"] != "healthy"]
    keys = {}
    for d in chosen:
        keys[id(d)], why = counterfactual_for(d, facts)
        if keys[id(d)] is None:
            d["verification"] = _unchecked(d["code"], why)
    todo = [d for d in chosen if keys[id(d)] is not None]
    if not todo:
        return diagnoses
    if timeout is None:  # a hung run is killed: the time limit, else ten times the original's, and start-up
        own = original.seconds if original is not None else 60.0
        timeout = 60.0 + (time_limit if time_limit is not None else 10 * max(own, 6.0))
    try:  # a loss_wiring diagnosis: the re-run (unchanged) also measures the rewired loss, observe-only
        wiring = any(keys[id(d)] == "loss_wiring" for d in todo)
        rerun = run_child(
            script, args, steps, time_limit, "loss_wiring" if wiring else None, 0.0 if wiring else None, timeout=timeout
        )
        if original is None:  # called without the diagnosing run: run the original too
            original = run_child(script, args, steps, time_limit, timeout=timeout)
        for d in todo:
            d["verification"] = verify_one(keys[id(d)], script, args, steps, original, rerun, time_limit, timeout)
    except KeyboardInterrupt:
        for d in todo:
            d.setdefault(
                "verification",
                {
                    **_unchecked(d["code"]),
                    "verdict": "inconclusive",
                    "detail": "inconclusive: cancelled (Ctrl-C) before this verification ran",
                },
            )
    return _reorder(diagnoses)


def _reorder(diagnoses: list[dict]) -> list[dict]:
    """Confirmed diagnoses first (in their order); a refuted one below them says it was demoted."""
    confirmed = [d for d in diagnoses if (d.get("verification") or {}).get("verdict") == "confirmed"]
    if not confirmed:
        return diagnoses
    first = next(i for i, d in enumerate(diagnoses) if d is confirmed[0])
    rest = []
    for i, d in enumerate(diagnoses):
        if any(d is c for c in confirmed):
            continue
        rest.append(d)
        v = d.get("verification") or {}
        if v.get("verdict") == "refuted" and i < first:
            v["detail"] += f"; demoted below the confirmed {confirmed[0]['code']}"
    return confirmed + rest


# -- the child process ---------------------------------------------------------------------------------------
def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stepaudit.doctor.verify", description="One verification run of stepaudit doctor --verify."
    )
    parser.add_argument("--fix", default=None, choices=sorted(COUNTERFACTUALS), help="the counterfactual to install")
    parser.add_argument("--factor", type=float, default=None, help="its factor (learning-rate fixes)")
    parser.add_argument("--max-steps", type=int, required=True, metavar="N", help="0: to the script's end")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S")
    parser.add_argument("--out", required=True, help="where to write the run's loss summary (JSON)")
    parser.add_argument("--protect", default=None, help="the folder this one mirrors: writes into it are refused")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def watched_run(
    script,
    args: list[str],
    steps: int | None,
    time_limit: float | None = None,
    fix: str | None = None,
    factor: float | None = None,
) -> RunLoss:
    """Run the script in this process under the watcher, with ``fix`` installed (or none); its ``RunLoss``."""
    from . import counterfactual
    from .facts import Facts
    from .passive import PassiveWatcher
    from .runner import run_script

    handles = counterfactual.install(fix, factor) if fix else []  # (it clears the counts of ``applied``)
    watcher = PassiveWatcher(max_steps=steps or None, time_limit=time_limit)
    started = time.monotonic()
    try:
        outcome = run_script(script, args, watcher)
    finally:
        counterfactual.remove(handles)
    observations = watcher.observations()
    facts = Facts(watcher.records, {}, observations)
    error = None if outcome.exit_status == 0 else _last_line(outcome.error)
    found = from_facts(facts, observations.get("steps", watcher.step_count), error, time.monotonic() - started)
    found.applied = counterfactual.applied() if fix in REPORTING else None
    if fix == "loss_wiring" and factor == 0.0:
        from .counterfactual_wiring import SHADOW

        found.shadow = _shadow_summary(SHADOW, facts.batch_size)
    return found


def _mirror(source: Path, target: Path) -> None:
    """``target`` as a folder holding a symbolic link to each entry of ``source``."""
    target.mkdir()
    for entry in source.iterdir():
        (target / entry.name).symlink_to(entry.resolve() if entry.is_symlink() else entry.absolute())


def _writes(mode, flags) -> tuple[bool, bool]:
    """(opens for writing, truncates or creates afresh) from an ``open`` audit event's mode or flags."""
    if isinstance(mode, str):
        return any(c in mode for c in "wax+"), "w" in mode or "x" in mode
    flags = flags if isinstance(flags, int) else 0
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT)), bool(flags & os.O_TRUNC)


def own_copy(path: str | os.PathLike, mode, flags, scratch: Path, protected: list[Path]) -> None:
    """Before ``path`` is opened for writing: make it the scratch copy's own, or refuse a protected one."""
    writing, fresh = _writes(mode, flags)
    if not writing or not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        return
    where = Path(os.path.abspath(path))
    if where.is_relative_to(scratch):
        current = scratch
        parts = where.relative_to(scratch).parts
        for i, part in enumerate(parts):
            current = current / part
            if not current.is_symlink():
                continue
            target = Path(os.readlink(current))
            if i < len(parts) - 1 and target.is_dir():  # a linked folder on the way: a real folder of links
                current.unlink()
                _mirror(target, current)
            elif i == len(parts) - 1 and not target.is_dir():  # the file itself: the run's own copy
                current.unlink()
                if not fresh and target.exists():
                    shutil.copy2(target, current)
    real = Path(os.path.realpath(where))
    for root in protected:
        if real.is_relative_to(root) and not real.is_relative_to(scratch.parent):  # the run's own temp folder
            raise PermissionError(
                f"stepaudit doctor --verify: the script writes to {real}, outside the scratch copy "
                f"of {root}; verification runs never change your files (run the script from "
                "the folder it writes into)"
            )


def _guard_torch_save(scratch: Path, protected: list[Path]) -> None:
    """``torch.save`` writes through C++ (no ``open`` event): give it the same scratch copy first."""
    import functools

    import torch

    original = torch.save

    @functools.wraps(original)
    def save(obj, f, *args, **kwargs):
        own_copy(f, "wb", 0, scratch, protected)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def child_main(argv: list[str] | None = None) -> int:
    """The child entry: one ``watched_run``, its ``RunLoss`` written as JSON to ``--out``."""
    options = _child_parser().parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if options.protect:  # this process's folder is the scratch copy of --protect
        scratch = Path(os.getcwd())
        protected = [Path(options.protect).resolve(), Path(options.script).resolve().parent]

        def guard(event: str, event_args: tuple) -> None:
            if event == "open" and len(event_args) == 3:
                own_copy(*event_args, scratch, protected)

        sys.addaudithook(guard)
        _guard_torch_save(scratch, protected)
    found = watched_run(options.script, args, options.max_steps, options.time_limit, options.fix, options.factor)
    Path(options.out).write_text(json.dumps(asdict(found)))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
