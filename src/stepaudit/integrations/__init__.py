"""Thin adapters from training frameworks onto the active capture (``Audit.watch``).

``stepaudit.integrations.lightning.AuditCallback`` — Lightning's ``Trainer.fit``.
Each module imports its framework only when it is imported itself.
"""
