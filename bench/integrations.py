"""What the Lightning callback and the Hugging Face mixin cost: time per optimizer step inside each framework.

Arms, interleaved in rotating order, medians over repetitions:
- Lightning: ``Trainer.fit`` of the digits MLP 64-256-256-10 (batch 128, SGD lr 0.05) for ``--steps``
  steps, plain vs ``AuditCallback(every=1)`` vs ``AuditCallback(every=16)``;
- Hugging Face: ``Trainer.train`` of a tiny BERT (2 layers, d=64, built from its config, nothing
  downloaded) on random tokens for ``--steps`` steps, plain vs ``AuditMixin`` with every=1 and every=16.

The framework's own per-step work (progress tracking, callbacks, logging) is in every arm, so the
ratios here are what a user of each framework sees. Steps are timed from the ``WARMUP``-th optimizer step
to the end of training (a timing callback in each framework), so one-time costs — the framework's set-up,
the audit's first step (which measures the rounding noise once on a float64 twin) — are left out.

    python bench/integrations.py [--steps 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit.workloads import load_digits, mlp  # noqa: E402

WARMUP = 10  # optimizer steps before the clock starts


def lightning_arm(audit_every: int | None, steps: int, tmp: Path) -> float:
    """Seconds per step of Trainer.fit, with or without the callback."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from stepaudit.integrations.lightning import AuditCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == WARMUP and not hasattr(self, "start"):
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.stop = time.perf_counter()

    x, y, _, _ = load_digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, drop_last=True)
    pl.seed_everything(0, verbose=False)
    clock = Clock()
    callbacks = (
        [clock] if audit_every is None else [clock, AuditCallback(run=tmp / f"lit{audit_every}", every=audit_every)]
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Module(), loader)
    return (clock.stop - clock.start) / (steps - WARMUP)


def huggingface_arm(audit_every: int | None, steps: int, tmp: Path) -> float:
    """Seconds per step of Trainer.train, with or without the mixin."""
    import transformers

    from stepaudit.integrations.huggingface import AuditMixin

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids, self.labels = (
                torch.randint(1, 100, (512, 32), generator=g),
                torch.randint(0, 2, (512,), generator=g),
            )

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    class Audited(AuditMixin, transformers.Trainer):
        pass

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == WARMUP and not hasattr(self, "start"):
                self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.stop = time.perf_counter()

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "hf-out"),
        max_steps=steps,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = Clock()
    if audit_every is None:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[clock])
    else:
        trainer = Audited(
            model=model,
            args=args,
            train_dataset=Tokens(),
            callbacks=[clock],
            audit_options={"run": tmp / f"hf{audit_every}", "every": audit_every},
        )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log lines in the table's output
    trainer.train()
    return (clock.stop - clock.start) / (steps - WARMUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frameworks", nargs="+", default=["lightning", "huggingface"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    arms = {"plain": None, "every=1": 1, "every=16": 16}
    runners = {"lightning": lightning_arm, "huggingface": huggingface_arm}
    rows = []
    for framework in args.frameworks:
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        with tempfile.TemporaryDirectory() as tmp:
            runners[framework](None, WARMUP + 5, Path(tmp))  # warm-up (imports, first-call costs)
            for rep in range(args.repeats):
                order = list(arms)[rep % 3 :] + list(arms)[: rep % 3]
                for arm in order:
                    times[arm].append(runners[framework](arms[arm], args.steps, Path(tmp)))
        med = {arm: statistics.median(t) for arm, t in times.items()}
        rows.append((framework, med))
        print(framework, {arm: f"{s * 1e3:.2f} ms" for arm, s in med.items()}, flush=True)
    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{args.steps} steps, median of {args.repeats}"
    )
    print("| framework | plain, per step | AuditCallback / AuditMixin every=1 | every=16 |\n|---|---:|---:|---:|")
    for framework, med in rows:
        plain = med["plain"]
        print(
            f"| {framework} | {plain * 1e3:.2f} ms | ×{med['every=1'] / plain:.2f} | ×{med['every=16'] / plain:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
