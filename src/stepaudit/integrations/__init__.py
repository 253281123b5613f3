"""Thin adapters from training frameworks onto the active capture (``Audit.watch``).

- ``stepaudit.integrations.lightning.AuditCallback``: Lightning's ``Trainer.fit``;
- ``stepaudit.integrations.huggingface.AuditMixin``: a ``transformers.Trainer`` subclass.

Each module imports its framework only when it is imported itself.
"""
