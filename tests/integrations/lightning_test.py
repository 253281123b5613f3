"""AuditCallback under a real Lightning Trainer: training bit-identical, records right, logs untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stepaudit

pl = pytest.importorskip("lightning.pytorch")
from support.identity import assert_same_model, assert_same_optimizer, assert_same_rng, rng_state  # noqa: E402

from stepaudit.integrations.lightning import AuditCallback  # noqa: E402


class Net(pl.LightningModule):
    """Dropout and BatchNorm (train-mode randomness and buffers); logs its loss every step and per epoch."""

    def __init__(self, fail_at: int | None = None, optimizer: str = "adam", lr: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        self.fail_at, self.optimizer_name, self.lr = fail_at, optimizer, lr

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(same_batch: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    if same_batch:  # one batch, seen every step: loss_after of step k is loss_before of step k+1
        x, y = x[:32].repeat(4, 1), y[:32].repeat(4)
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def quiet_trainer(**options) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``options`` add to it."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def fit(
    callbacks=(), steps: int = 7, same_batch: bool = False, module_class=None, trainer_options=None, **module_kwargs
):
    pl.seed_everything(0, verbose=False)
    module = (module_class or Net)(**module_kwargs)
    trainer = quiet_trainer(max_steps=steps, callbacks=list(callbacks), **(trainer_options or {}))
    trainer.fit(module, loader(same_batch))
    return module, trainer


def test_training_is_bit_identical_with_the_callback(tmp_path):
    plain, plain_trainer = fit()
    plain_rng = rng_state()
    callback = AuditCallback(run=tmp_path / "run")
    audited, audited_trainer = fit([callback])
    assert_same_rng(rng_state(), plain_rng)  # each fit seeds torch, Python and NumPy first
    assert_same_model(plain, audited)  # weights and BatchNorm buffers
    assert_same_optimizer(plain_trainer.optimizers[0], audited_trainer.optimizers[0])
    # The re-evaluations did not log: the epoch mean of train_loss is the training passes' own.
    assert torch.equal(
        plain_trainer.callback_metrics["train_loss_epoch"], audited_trainer.callback_metrics["train_loss_epoch"]
    )
    records = callback.audit.records
    assert [r["step"] for r in records] == list(range(7))
    assert all(r["verdict"] in ("decrease", "increase", "flat") for r in records)
    assert len(stepaudit.load(tmp_path / "run", table="steps")) == 7


def test_loss_after_is_the_next_steps_loss_before_on_a_repeated_batch(tmp_path):
    """Oracle: with one batch every step, the same function at the same weights is the next step's training loss
    (computed by Lightning's own closure). Dropout draws differ step to step, so eval-free nets only."""
    callback = AuditCallback(run=tmp_path / "run", loss_fn=lambda m, b: nn.functional.cross_entropy(m.net(b[0]), b[1]))
    pl.seed_everything(0, verbose=False)
    module = Net(optimizer="sgd")
    module.net[3].p = 0.0  # no dropout: the loss is a function of weights and batch alone
    trainer = quiet_trainer(max_steps=5, callbacks=[callback])
    trainer.fit(module, loader(same_batch=True))
    records = callback.audit.records
    for this, following in zip(records, records[1:]):
        assert this["loss_after"] == pytest.approx(following["loss_before"], rel=1e-6, abs=1e-7)
        assert this["delta"] == pytest.approx(this["loss_after"] - this["loss_before"], rel=1e-9, abs=1e-12)


def test_every_n_and_training_step_loss_with_dict_output(tmp_path):
    callback = AuditCallback(run=tmp_path / "run", every=3)
    fit([callback], steps=7)
    assert [r["step"] for r in callback.audit.records] == [0, 3, 6]
    assert callback.audit.closed


def test_gradient_accumulation_is_refused_with_the_fix(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[AuditCallback(run=tmp_path / "run")])
    with pytest.raises(ValueError, match="accumulate=N"):
        trainer.fit(Net(), loader())


def test_a_crash_keeps_the_committed_steps_and_closes_the_audit(tmp_path):
    callback = AuditCallback(run=tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        fit([callback], fail_at=3)
    assert callback.audit.closed and not callback.adapter.holding
    assert list(stepaudit.load(tmp_path / "run", table="steps")["step"]) == [0, 1, 2]


def test_unknown_optimizer_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        fit([AuditCallback(run=tmp_path / "run", optimizer=1)], steps=1)


class ManualNet(Net):
    """Manual optimization: training_step calls manual_backward and opt.step() itself."""

    def __init__(self):
        super().__init__(optimizer="sgd")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


def test_manual_optimization_is_audited_and_unchanged(tmp_path):
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        module = ManualNet()
        trainer = quiet_trainer(max_steps=5, callbacks=callbacks)
        trainer.fit(module, loader())
        return module

    with pytest.raises(ValueError, match="loss_fn"):  # training_step steps the optimizer: not a loss to re-evaluate
        run([AuditCallback(run=tmp_path / "refused")])
    plain = run([])
    callback = AuditCallback(run=tmp_path / "run", loss_fn=lambda m, b: nn.functional.cross_entropy(m.net(b[0]), b[1]))
    audited = run([callback])
    for (name, a), (_, b) in zip(plain.state_dict().items(), audited.state_dict().items()):
        assert torch.equal(a, b), name
    records = callback.audit.records
    assert [r["step"] for r in records] == list(range(5))
    assert all(r["verdict"] in ("decrease", "increase", "flat") for r in records)


def test_bf16_mixed_re_evaluates_under_the_trainers_autocast(tmp_path):
    """At lr 1e-6 the step changes the loss far below bf16 rounding: delta within its noise, verdict flat.
    Re-evaluated outside Lightning's autocast, loss_after was fp32 against a bf16 loss_before: 'decrease'."""
    callback = AuditCallback(run=tmp_path / "run")
    fit([callback], steps=4, optimizer="sgd", lr=1e-6, trainer_options={"precision": "bf16-mixed"})
    records = callback.audit.records
    assert [r["verdict"] for r in records] == ["flat"] * 4
    assert all(abs(r["delta"]) <= r["rounding_noise"] for r in records)


class NoBatchIdx(Net):
    def training_step(self, batch):  # Lightning accepts a training_step without batch_idx
        return super().training_step(batch, 0)


def test_training_step_without_batch_idx(tmp_path):
    callback = AuditCallback(run=tmp_path / "run")
    fit([callback], steps=3, module_class=NoBatchIdx)
    assert [r["verdict"] != "error" for r in callback.audit.records] == [True] * 3


def test_a_gradient_accumulation_scheduler_is_refused_up_front(tmp_path):
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        fit([AuditCallback(run=tmp_path / "run"), GradientAccumulationScheduler({0: 1, 1: 3})], steps=6)


class SkipsSecondBatch(Net):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 1 else None  # -1: Lightning skips the rest of the epoch


def test_batches_lightning_skips_are_not_counted_as_skipped_steps(tmp_path):
    import warnings

    callback = AuditCallback(run=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([callback], steps=3, module_class=SkipsSecondBatch)
    assert [r["step"] for r in callback.audit.records] == [0, 1, 2]
    assert callback.audit.skipped_steps == 0
    assert not [w for w in caught if "no optimizer step happened" in str(w.message)]


class WithMetric(Net):
    """Two torchmetrics states kinds: tensor sums (accuracy) and a growing list (CatMetric)."""

    def __init__(self):
        super().__init__()
        import torchmetrics

        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.losses = torchmetrics.aggregation.CatMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.losses.update(loss.detach())
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss


@pytest.mark.parametrize("probes", [{}, {"sharpness": 1, "quadratic": 1}])
def test_torchmetrics_state_is_put_back_after_re_evaluations(tmp_path, probes):
    """Also through the curvature probes, whose HVPs re-evaluate the loss inside torch.func transforms."""
    plain_module, plain = fit(steps=6, module_class=WithMetric)
    callback = AuditCallback(run=tmp_path / "run", probes=probes)
    audited_module, audited = fit([callback], steps=6, module_class=WithMetric)
    assert torch.equal(plain.callback_metrics["train_acc"], audited.callback_metrics["train_acc"])
    for name in ("tp", "fp", "tn", "fn"):
        assert torch.equal(getattr(plain_module.train_acc, name), getattr(audited_module.train_acc, name))
    assert audited_module.train_acc._update_count == plain_module.train_acc._update_count
    assert torch.equal(plain_module.losses.compute(), audited_module.losses.compute())
    assert len(callback.audit.records) == 6


def test_a_resumed_fit_continues_the_step_count(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = Net()
    first = quiet_trainer(max_steps=3)
    first.fit(module, loader())
    first.save_checkpoint(tmp_path / "three.ckpt")
    callback = AuditCallback(run=tmp_path / "resumed", every=2)
    quiet_trainer(max_steps=7, callbacks=[callback]).fit(Net(), loader(), ckpt_path=tmp_path / "three.ckpt")
    assert [r["step"] for r in callback.audit.records] == [4, 6]


def test_each_rank_writes_its_own_store_inside_the_run_folder(tmp_path):
    """Several processes known only to the Trainer (no process group): rank 1 writes <run>/rank1 (ranks sharing a
    store would overwrite each other); under a real process group Audit places it (ddp test below)."""
    from types import SimpleNamespace

    module = Net()
    trainer = SimpleNamespace(
        accumulate_grad_batches=1,
        callbacks=[],
        optimizers=[module.configure_optimizers()],
        world_size=2,
        global_rank=1,
        global_step=0,
        precision_plugin=None,
    )
    callback = AuditCallback(run=tmp_path / "run")
    callback.on_train_start(trainer, module)
    assert callback.audit.run == tmp_path / "run" / "rank1"
    callback.audit.close()


LIGHTNING_SCRIPT = """
import torch, lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=5.0)  # far too large

g = torch.Generator().manual_seed(0)
x, y = torch.randn(512, 8, generator=g), torch.randint(0, 3, (512,), generator=g)
pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, accelerator="cpu").fit(M(), DataLoader(TensorDataset(x, y), batch_size=32))
"""


def test_the_doctor_diagnoses_an_unchanged_lightning_script(tmp_path):
    """Passive capture needs no callback: the global optimizer hooks see Lightning's steps."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(LIGHTNING_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--json", "--run", str(tmp_path / "run"), str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["steps"] == 60 and result["stopped"] == "finished"
    assert result["diagnoses"][0]["code"] == "lr_too_high"


def test_with_several_optimizers_a_resumed_count_is_divided_among_them(tmp_path):
    """Lightning's global_step counts every optimizer's steps: a GAN resumed at 6 has taken 3 steps of each."""
    from types import SimpleNamespace

    module = ManualNet()
    optimizers = [
        torch.optim.SGD(module.net[0].parameters(), lr=0.1),
        torch.optim.SGD(module.net[4].parameters(), lr=0.1),
    ]
    trainer = SimpleNamespace(
        accumulate_grad_batches=1,
        callbacks=[],
        optimizers=optimizers,
        world_size=1,
        global_rank=0,
        global_step=6,
        precision_plugin=None,
    )
    callback = AuditCallback(run=tmp_path / "run", loss_fn=lambda m, b: m.net(b[0]).sum())
    with pytest.warns(UserWarning, match="first_step"):
        callback.on_train_start(trainer, module)
    assert callback.audit.due(3) and callback.audit.next_step == 3
    callback.audit.close()
