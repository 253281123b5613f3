"""AuditMixin under a real transformers Trainer: training bit-identical, records right, refusals clear."""

from __future__ import annotations

import pytest
import torch

import stepaudit

transformers = pytest.importorskip("transformers")
from support.identity import assert_same_model, assert_same_optimizer, assert_same_rng, rng_state  # noqa: E402

from stepaudit.integrations.huggingface import AuditMixin  # noqa: E402


class AuditedTrainer(AuditMixin, transformers.Trainer):
    pass


class Tokens(torch.utils.data.Dataset):
    """64 random token sequences with binary labels (nothing downloaded)."""

    def __init__(self, n: int = 64, length: int = 12, same: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        if same:  # 8 examples, one batch per epoch: loss_after of step k is loss_before of step k+1
            self.ids, self.labels = self.ids[:8], self.labels[:8]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert(dropout: float = 0.1):
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def quiet_args(output_dir, **overrides) -> transformers.TrainingArguments:
    """CPU, seeded, batch 8, lr 1e-3, no saving, logging or reporting; ``overrides`` change any of it."""
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**options, **overrides})


def train(
    tmp_path,
    trainer_class=transformers.Trainer,
    steps: int = 6,
    dropout: float = 0.1,
    same: bool = False,
    accumulation: int = 1,
    label_smoothing: float = 0.0,
    save_strategy: str = "no",
    save_steps: int = 500,
    learning_rate: float = 1e-3,
    **extra,
):
    args = quiet_args(
        tmp_path / "out",
        max_steps=steps,
        learning_rate=learning_rate,
        save_strategy=save_strategy,
        save_steps=save_steps,
        gradient_accumulation_steps=accumulation,
        label_smoothing_factor=label_smoothing,
    )
    model = tiny_bert(dropout)
    trainer = trainer_class(model=model, args=args, train_dataset=Tokens(same=same), **extra)
    trainer.train()
    return model, trainer


def test_training_is_bit_identical_with_the_mixin(tmp_path):
    plain, plain_trainer = train(tmp_path / "plain")
    plain_rng = rng_state()
    audited, trainer = train(tmp_path / "audited", AuditedTrainer, audit_options={"run": tmp_path / "run"})
    assert_same_rng(rng_state(), plain_rng)  # the Trainer seeds torch, Python and NumPy from args.seed
    assert_same_model(plain, audited)
    assert_same_optimizer(plain_trainer.optimizer, trainer.optimizer)
    records = trainer.audit.records
    assert [r["step"] for r in records] == list(range(6)) and trainer.audit.closed
    assert all(r["verdict"] in ("decrease", "increase", "flat") for r in records)
    assert len(stepaudit.load(tmp_path / "run", table="steps")) == 6


def summed_loss(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func with the documented signature: a sum normalised by the Trainer's item count."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("variant", ["plain", "label smoothing", "compute_loss_func"])
def test_loss_after_is_the_next_steps_loss_before_on_a_repeated_batch(tmp_path, variant):
    """Oracle: same batch every step and no dropout, so loss_after(k) is the loss at the weights of step k+1,
    whose loss_before is the Trainer's own training loss. Label smoothing makes compute_loss pop "labels" from
    its inputs (the audit must hand it a copy); a compute_loss_func divides by num_items_in_batch (it must get it)."""
    extra = {"label_smoothing": 0.1} if variant == "label smoothing" else {}
    if variant == "compute_loss_func":
        extra["compute_loss_func"] = summed_loss
    _, trainer = train(
        tmp_path, AuditedTrainer, dropout=0.0, same=True, audit_options={"run": tmp_path / "run"}, **extra
    )
    records = trainer.audit.records
    assert len(records) == 6 and all(r["verdict"] != "error" for r in records)
    for this, following in zip(records, records[1:]):
        assert this["loss_after"] == pytest.approx(following["loss_before"], rel=1e-5, abs=1e-7)


def test_every_n_and_an_explicit_loss_fn(tmp_path):
    def loss_fn(model, inputs):
        return model(**inputs).loss

    _, trainer = train(
        tmp_path, AuditedTrainer, steps=7, audit_loss_fn=loss_fn, audit_options={"run": tmp_path / "run", "every": 3}
    )
    assert [r["step"] for r in trainer.audit.records] == [0, 3, 6]


def test_training_with_gradient_accumulation_is_bit_identical(tmp_path):
    plain, plain_trainer = train(tmp_path / "plain", accumulation=2)
    plain_rng = torch.get_rng_state()
    audited, trainer = train(
        tmp_path / "audited", AuditedTrainer, accumulation=2, audit_options={"run": tmp_path / "run"}
    )
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, a), (_, b) in zip(plain.state_dict().items(), audited.state_dict().items()):
        assert torch.equal(a, b), name
    records = trainer.audit.records
    assert [r["step"] for r in records] == list(range(6))
    assert all(r["verdict"] in ("decrease", "increase", "flat") for r in records)


class PaddedText(torch.utils.data.Dataset):
    """16 token sequences of random length, padded; labels -100 on the padding (a causal LM's batch)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 40, (16, 12), generator=g)
        self.lengths = torch.randint(3, 13, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        mask = (torch.arange(12) < self.lengths[i]).long()
        labels = torch.where(mask.bool(), self.ids[i], torch.full_like(self.ids[i], -100))
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": labels}


def gpt2_trainer(tmp_path, audit_options, steps=5, **args_extra):
    """A tiny GPT-2 (no dropout) on ``PaddedText``, accumulating 2 micro-batches per step, audited."""
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    args = quiet_args(tmp_path / "out", max_steps=steps, gradient_accumulation_steps=2, **args_extra)
    return AuditedTrainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=PaddedText(), audit_options=audit_options
    )


def test_accumulated_token_normalised_objective_is_the_trainers(tmp_path):
    """Oracle: a causal LM whose two micro-batches hold different numbers of label tokens, seen every step
    (one optimizer step per epoch). The Trainer's objective is Σ token losses / all tokens of the step, not the
    mean of the micro-batch means; loss_after(k) at the new weights must equal the next step's training loss."""
    trainer = gpt2_trainer(tmp_path, {"run": tmp_path / "run"})
    trainer.train()
    records = trainer.audit.records
    assert len(records) == 5 and trainer.audit.skipped_steps == 0
    for this, following in zip(records, records[1:]):
        assert this["loss_after"] == pytest.approx(following["loss_before"], rel=1e-5, abs=1e-7)


def test_accumulated_steps_measure_rounding_noise_and_float64_on_the_same_objective(tmp_path):
    """The float64 twin evaluates cast copies of the micro-batches: they must get the step's scale and item count.
    Otherwise the rounding noise was measured between two different objectives (every verdict 'flat') and
    precision="float64" audited another objective than the Trainer's."""
    default = gpt2_trainer(tmp_path / "default", {"run": tmp_path / "run32"})
    default.train()
    exact = gpt2_trainer(tmp_path / "exact", {"run": tmp_path / "run64", "precision": "float64"})
    exact.train()
    assert max(r["rounding_noise"] for r in default.audit.records) < 1e-5
    assert {r["verdict"] for r in default.audit.records} != {"flat"}
    for ours, theirs in zip(exact.audit.records, default.audit.records):  # same training: the audit changes nothing
        assert ours["loss_before"] == pytest.approx(theirs["loss_before"], rel=1e-5)
        assert ours["loss_after"] == pytest.approx(theirs["loss_after"], rel=1e-5)


def test_a_loss_already_scaled_for_accumulation_without_an_item_count(tmp_path):
    """loss_is_scaled_for_ga=True and no num_items_in_batch (the Trainer's documented pattern for a compute_loss
    that divides by the accumulation itself): the Trainer then adds micro-batch losses without dividing."""

    class SelfScaled(AuditedTrainer):
        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss / self.args.gradient_accumulation_steps

    args = quiet_args(tmp_path / "out", max_steps=5, gradient_accumulation_steps=2)
    trainer = SelfScaled(
        model=tiny_bert(dropout=0.0), args=args, train_dataset=Tokens(n=16), audit_options={"run": tmp_path / "run"}
    )
    trainer.model_accepts_loss_kwargs = False  # no item count: the Trainer relies on the flag alone
    trainer.train()
    records = trainer.audit.records
    for this, following in zip(records, records[1:]):
        assert this["loss_after"] == pytest.approx(following["loss_before"], rel=1e-5)


def test_the_first_step_after_a_mid_epoch_resume_replays_its_dropout_masks(tmp_path):
    """Oracle: at learning rate 0 nothing moves, so loss_after equals the training loss when the masks match (to
    rounding: (L₁ + L₂)/2 against L₁/2 + L₂/2; wrong masks are off by ~1e-3). A resumed run reloads its RNG state
    after fetching the micro-batches: the watch must open after that."""
    first, _ = train(
        tmp_path / "first", steps=2, save_strategy="steps", save_steps=2, accumulation=2, learning_rate=0.0
    )
    args = quiet_args(tmp_path / "first" / "out", max_steps=5, learning_rate=0.0, gradient_accumulation_steps=2)
    trainer = AuditedTrainer(
        model=tiny_bert(), args=args, train_dataset=Tokens(), audit_options={"run": tmp_path / "resumed"}
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "first" / "out" / "checkpoint-2"))
    records = trainer.audit.records
    assert [r["step"] for r in records] == [2, 3, 4]
    assert all(abs(r["delta"]) <= 1e-6 for r in records), [r["delta"] for r in records]


def test_a_crash_keeps_the_committed_steps_and_closes_the_audit(tmp_path):
    class Crashing(AuditedTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.state.global_step == 3 and model.training and torch.is_grad_enabled():
                raise RuntimeError("boom")
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = quiet_args(tmp_path / "out", max_steps=6)
    trainer = Crashing(model=tiny_bert(), args=args, train_dataset=Tokens(), audit_options={"run": tmp_path / "run"})
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert trainer.audit.closed and not trainer.audit_adapter.holding
    assert list(stepaudit.load(tmp_path / "run", table="steps")["step"]) == [0, 1, 2]


def test_the_training_loss_is_loss_before_no_extra_forward(tmp_path):
    """The mixin hands the Trainer's training loss to the audit: two forwards per audited step (training,
    loss_after), plus at most one for the rounding-noise measurement."""
    calls = []
    original_init = AuditedTrainer.__init__

    def counting_init(self, *args, model=None, **kwargs):
        model.register_forward_hook(lambda module, inputs, output: calls.append(module is model))
        original_init(self, *args, model=model, **kwargs)

    class Counted(AuditedTrainer):
        __init__ = counting_init

    _, trainer = train(tmp_path, Counted, steps=6, audit_options={"run": tmp_path / "run"})
    assert len(trainer.audit.records) == 6
    assert 12 <= sum(calls) <= 13


def test_a_resumed_run_continues_the_step_count(tmp_path):
    first, _ = train(tmp_path / "first", steps=3, save_strategy="steps", save_steps=3)
    args = quiet_args(tmp_path / "first" / "out", max_steps=7)
    trainer = AuditedTrainer(
        model=tiny_bert(), args=args, train_dataset=Tokens(), audit_options={"run": tmp_path / "resumed", "every": 2}
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "first" / "out" / "checkpoint-3"))
    assert [r["step"] for r in trainer.audit.records] == [4, 6]


def test_each_rank_writes_its_own_store_inside_the_run_folder(tmp_path, monkeypatch):
    """Several processes known only to the Trainer's arguments (no process group): rank 1 writes <run>/rank1
    (ranks sharing a store would overwrite each other); under a process group Audit places it (adapter_test)."""
    args = quiet_args(tmp_path / "out")
    trainer = AuditedTrainer(
        model=tiny_bert(), args=args, train_dataset=Tokens(), audit_options={"run": tmp_path / "run"}
    )
    trainer.create_optimizer()
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    monkeypatch.setattr(type(trainer.args), "process_index", property(lambda self: 1))
    audit = trainer._build_audit(trainer.model)
    assert audit.run == tmp_path / "run" / "rank1"
    audit.close()
