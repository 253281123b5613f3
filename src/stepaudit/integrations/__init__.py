"""Thin adapters from training frameworks onto the active capture (``Audit.watch``).

- ``stepaudit.integrations.lightning.AuditCallback``: Lightning's ``Trainer.fit``;
- ``stepaudit.integrations.huggingface.AuditMixin``: a ``transformers.Trainer`` subclass;
- ``_held.HeldWatch``: the ``audit.watch`` both hold open from one framework hook to a later one.

Each module imports its framework only when it is imported itself.
"""
