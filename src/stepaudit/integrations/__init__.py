"""Thin adapters from training frameworks onto the active capture (``Audit``'s public step API, ``stepapi.py``).

- ``stepaudit.integrations.lightning.AuditCallback``: Lightning's ``Trainer.fit``;
- ``stepaudit.integrations.huggingface.AuditMixin``: a ``transformers.Trainer`` subclass;
- ``stepaudit.integrations.fastai.AuditCallback``: a fastai ``Learner`` (through the public step API);
- ``_held.HeldWatch``: the step both hold open from one framework hook to a later one (``begin_step``/``end_step``).

Each module imports its framework only when it is imported itself.
"""
