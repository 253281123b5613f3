"""stepaudit: audit every optimizer step of a PyTorch run and say, with honest numbers, why it trains or not.

``import stepaudit`` imports no submodule: each public name loads its module on first use (PEP 562),
so a command that only renders a report or explains an expression never pays for the audit, and
``import stepaudit`` never pays for the explainer, the report, the doctor or pandas.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (submodule, attribute), imported on first access
_LAZY = {
    "Audit": ("audit", "Audit"),
    "AuditError": ("audit", "AuditError"),
    "RunStoreError": ("store", "RunStoreError"),
    "load": ("store", "load"),
    "explain": ("explain", "explain"),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .audit import Audit, AuditError
    from .explain import explain
    from .store import RunStoreError, load


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and keep the name."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package module: ``stepaudit.explain`` stays the function when the ``explain`` subpackage loads.

    Importing a submodule binds it as an attribute of its package; for ``explain`` that would replace the
    function by the subpackage, so the binding is redirected to the subpackage's function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "explain" and isinstance(value, types.ModuleType) and hasattr(value, "explain"):
            value = value.explain
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
