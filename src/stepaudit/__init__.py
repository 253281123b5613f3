"""stepaudit: audit every optimizer step of a PyTorch run and say, with honest numbers, why it trains or not."""

from __future__ import annotations

__version__ = "0.1.0"

from .audit import Audit, AuditError  # noqa: E402
from .explain import explain  # noqa: E402  (rebinds the name from the subpackage to the function)
from .store import RunStoreError, load  # noqa: E402


def diagnose(run_or_records, **kwargs):
    """Named diagnoses (doctor rules) for a run folder or a list of records."""
    from .doctor import diagnose as _diagnose

    return _diagnose(run_or_records, **kwargs)


def open_run(run):
    """A run folder read back for display: renders inline in a notebook, ``stepaudit report`` in a browser."""
    from .report.data import load_run

    return load_run(run)


def lr_find(model, optimizer, loss_fn, batches, *args, **kwargs):
    """Audited learning-rate range test that leaves training untouched (see ``stepaudit.lrfind.lr_find``)."""
    from .lrfind import lr_find as _lr_find

    return _lr_find(model, optimizer, loss_fn, batches, *args, **kwargs)


__all__ = ["Audit", "AuditError", "RunStoreError", "load", "explain", "diagnose", "open_run", "lr_find", "__version__"]
