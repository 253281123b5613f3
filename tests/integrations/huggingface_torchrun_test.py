"""The Hugging Face Trainer under torchrun, two CPU processes (gloo): one run folder (rank 1 inside it, no second
-rank suffix), the global fields the same in both ranks' stores, and training identical with and without the mixin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stepaudit

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(), reason="needs Linux and torch.distributed"
)

SCRIPT = """# The Hugging Face Trainer under torchrun, two CPU processes (argv: out folder, audited 0/1).
import sys

import torch
import transformers

from stepaudit.integrations.huggingface import AuditMixin


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(1, 40, (64, 12), generator=g), torch.randint(0, 2, (64,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class Audited(AuditMixin, transformers.Trainer):
    pass


out, audited = sys.argv[1], sys.argv[2] == "1"
torch.set_num_threads(1)
config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, num_labels=2)
torch.manual_seed(0)
model = transformers.BertForSequenceClassification(config)
args = transformers.TrainingArguments(output_dir=f"{out}/out{int(audited)}", per_device_train_batch_size=8,
                                      learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                      use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, max_steps=3)
extra = {"audit_options": {"run": f"{out}/run"}} if audited else {}
trainer = (Audited if audited else transformers.Trainer)(model=model, args=args, train_dataset=Tokens(), **extra)
trainer.train()
records = [{k: v for k, v in r.items() if k != "layers"} for r in trainer.audit.records] if audited else []
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
torch.save({"weights": state, "records": records}, f"{out}/rank{args.process_index}-{int(audited)}.pt")
torch.distributed.destroy_process_group()
"""


def _torchrun(folder, audited: bool) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2`` on the script (a free port each), audited or not."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*command, str(folder / "train_hf.py"), str(folder), str(int(audited))],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_trainer_under_torchrun_writes_one_run_folder_and_trains_identically(tmp_path):
    (tmp_path / "train_hf.py").write_text(SCRIPT)
    runs = [_torchrun(tmp_path, audited) for audited in (False, True)]  # both at once: half the wall time
    for proc in runs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["rank1"]
    result = {(r, a): torch.load(tmp_path / f"rank{r}-{a}.pt", weights_only=False) for r in (0, 1) for a in (0, 1)}
    for rank in (0, 1):
        for name, weight in result[rank, 0]["weights"].items():
            assert torch.equal(weight, result[rank, 1]["weights"][name]), f"rank {rank}: {name} differs"
    r0 = stepaudit.load(tmp_path / "run").to_dict("records")
    r1 = stepaudit.load(tmp_path / "run" / "rank1").to_dict("records")
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == [0, 1, 2]
    for a, b in zip(r0, r1):
        assert a["world_size"] == b["world_size"] == 2 and (a["rank"], b["rank"]) == (0, 1)
        for key in ("loss_before", "loss_after", "delta", "first_order", "verdict", "global_batch"):
            assert a[key] == b[key], key
        assert a["local_loss_before"] != b["local_loss_before"]
        assert a["loss_before"] == pytest.approx((a["local_loss_before"] + b["local_loss_before"]) / 2, rel=1e-6)
