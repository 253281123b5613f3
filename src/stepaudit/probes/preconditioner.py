"""Former home of the preconditioner reader, now ``probes/curvature/preconditioner.py`` (re-exported here)."""

from .curvature.preconditioner import Preconditioner, preconditioner

__all__ = ["Preconditioner", "preconditioner"]
