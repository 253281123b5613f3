"""Probes on data the step did not descend: the reference (held-out) loss, the next batch, gradient noise.

A step descends its own mini-batch's loss. ``reference`` measures what it did to fixed reference
data (and how its gradient agrees with the reference gradient), ``next_delta`` what it did to the
next batch, ``noise`` how noisy the batch gradient is (B_simple of McCandlish et al., 2018). One probe
per file; ``common.py`` holds the functional evaluation they share, ``shares.py`` the per-run shares.
"""

from __future__ import annotations

from .next_delta import NextDeltaState, next_delta_probe
from .noise import NOISE_METHODS, NoiseOptions, NoiseState, noise_capture, noise_probe
from .reference import ReferenceOptions, ReferenceState, check_reference, reference_batches, reference_probe
from .shares import run_shares

__all__ = [
    "NOISE_METHODS",
    "NextDeltaState",
    "NoiseOptions",
    "NoiseState",
    "ReferenceOptions",
    "ReferenceState",
    "check_reference",
    "next_delta_probe",
    "noise_capture",
    "noise_probe",
    "reference_batches",
    "reference_probe",
    "run_shares",
]
