"""Thin adapters from training frameworks onto the active capture (``Audit``'s public step API, ``stepapi.py``).

- ``stepaudit.integrations.lightning.AuditCallback``: Lightning's ``Trainer.fit``;
- ``stepaudit.integrations.huggingface.AuditMixin``: a ``transformers.Trainer`` subclass;
- ``stepaudit.integrations.fastai.AuditCallback``: a fastai ``Learner`` (through the public step API);
- ``adapter.Adapter``: what the three share — the ``Audit`` built with one run folder per training run (ranks
  inside it), ``first_step`` after a resume, and the step held open from one framework hook to a later one.

Each module imports its framework only when it is imported itself.
"""
