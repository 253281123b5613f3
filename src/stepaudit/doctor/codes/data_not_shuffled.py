"""Each batch holds one or two of the classes: the data is ordered by label and not shuffled (passive check)."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..facts import Facts
from .base import Code

MIN_BATCHES = 5  # inspected training batches a shuffled batch's class count is compared with
SORTED_SHARE = 0.8  # of those, the share that must hold few classes


def expected_classes(frequencies: list[float], size: int) -> float:
    """Classes a batch of ``size`` labels drawn at random from ``frequencies`` holds on average: Σ_k 1 − (1 − p_k)^n."""
    return sum(1.0 - (1.0 - p) ** size for p in frequencies)


def data_not_shuffled(f: Facts) -> Diagnosis | None:
    """Training batches hold far fewer classes than shuffled batches of their size would, and consecutive batches the
    same ones (passive check)."""
    counts = [float(c) for c in (f.obs.get("batch_label_pool") or {}).values() if c]
    batches = f.obs.get("batch_labels") or []  # [distinct classes, labels, step, the first 64 classes]
    total = sum(counts)
    if len(counts) < 2 or total <= 0 or len(batches) < MIN_BATCHES:
        return None
    frequencies = [c / total for c in counts]
    judged, few = 0, []
    for distinct, size, _, _ in batches:
        expected = expected_classes(frequencies, int(size))
        if expected < 1.9:  # a shuffled batch this small may hold one class by chance: not evidence
            continue
        judged += 1
        # half the classes a shuffled batch holds (one where it holds < 4): for 10 balanced classes and 32 labels,
        # a shuffled batch holds ≤ 5 classes with probability ~1e-6; for two balanced classes and 8 labels, one
        # class with probability 2⁻⁷; the frequencies are pooled over the same batches, so sorted batches bias
        # them towards the classes seen first, which only lowers ``expected``
        if distinct <= max(1.0, expected / 2):
            few.append((distinct, expected))
    if judged < MIN_BATCHES or len(few) < SORTED_SHARE * judged:
        return None
    # Sorted data gives runs: a batch holds the classes of the batch before it. Batches built from few classes
    # on purpose draw new ones every step (identity P×K sampling for metric learning), and a GAN's loss calls
    # alternate their constant targets from step to step: neither repeats its classes.
    overlaps = [
        len(set(a[3]) & set(b[3])) / len(set(a[3]) | set(b[3]))
        for a, b in zip(batches, batches[1:])
        if b[2] == a[2] + 1 and (a[3] or b[3])
    ]
    if len(overlaps) < 3 or sorted(overlaps)[len(overlaps) // 2] < 0.5:
        return None
    mean_distinct = sum(d for d, _ in few) / len(few)
    mean_expected = sum(e for _, e in few) / len(few)
    # error whatever the loss did: on batches of one class the training loss falls by fitting that class's
    # frequency (the bias), so a falling loss is no sign of learning here
    return Diagnosis(
        "data_not_shuffled",
        "error",
        _clip(0.6 + 0.3 * len(few) / judged),
        0,
        f"{len(few)} of {judged} inspected training batches held {mean_distinct:.1f} classes on average, where "
        f"shuffled batches of their size would hold {mean_expected:.1f} of the {len(counts)} classes seen, and "
        "consecutive batches held the same classes: the data "
        "arrives ordered by label, so each run of steps fits the class of the moment and undoes the last "
        "(a falling training loss on such batches means little).",
        "shuffle the training data every epoch: DataLoader(..., shuffle=True), or index with torch.randperm",
        whole_run=True,
    )


CODE = Code(
    name="data_not_shuffled",
    rule=data_not_shuffled,
    priority=45,
    causes=("lr_too_high", "exploding_gradients", "gradient_noise_dominates", "labels_unlearnable", "nonfinite"),
)
