"""A diagnosis record and the small helpers every rule shares (formatting, confidence clipping, "not training")."""

from __future__ import annotations

from dataclasses import dataclass

from .facts import Facts

SEVERITIES = ("error", "warning", "info")


@dataclass
class Diagnosis:
    """One named finding: what, how sure, since when, the numbers, and the change to make."""

    code: str
    severity: str
    confidence: float
    first_step: int | None
    evidence: str
    fix: str
    kind: str = ""  # sub-kind for causal ordering (e.g. loss_wiring "init")
    whole_run: bool = False  # judged over the whole run: no onset to compare with a cause's
    lr_direction: int = 0  # which way the fix moves the learning rate: −1 lower, +1 raise, 0 leaves it
    persistent: bool = False  # the mechanism lasted to the end at a level that matters, whatever the loss did
    mechanism_only: bool = False  # evidence of a mechanism only (step sizes, dead units), not of a rising loss

    def as_dict(self) -> dict:
        """The JSON contract: code, severity, confidence, first_step, evidence, fix."""
        return {
            "code": self.code,
            "severity": self.severity,
            "confidence": round(min(max(self.confidence, 0.0), 1.0), 3),
            "first_step": self.first_step,
            "evidence": self.evidence,
            "fix": self.fix,
        }


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}"


def clip(x: float) -> float:
    return min(max(x, 0.05), 0.99)


def not_training(f: Facts) -> bool:
    """The loss lost less than 10% of its starting value over the run [K: 'the loss should go down'], or it
    ended at the loss of predicting the label prior (whatever it started from)."""
    return (f.progress is not None and f.progress < 0.10) or f.stuck_at_prior
