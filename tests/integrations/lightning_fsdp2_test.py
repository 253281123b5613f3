"""Lightning's FSDP2 route: ModelParallelStrategy(data_parallel_size=2) with fully_shard in configure_model, two CPU
processes (gloo) started by Lightning's own launcher: one run folder, the global records on both ranks alike, no
error verdicts, and the gathered weights identical with and without the callback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stepaudit

pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(), reason="needs Linux and torch.distributed"
)

SCRIPT = """# Two CPU processes under ModelParallelStrategy, fully_shard per layer (argv: out folder, audited 0/1).
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from stepaudit.integrations.lightning import AuditCallback


class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


if __name__ == "__main__":
    out, audited = sys.argv[1], sys.argv[2] == "1"
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    callback = AuditCallback(run=f"{out}/run") if audited else None
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback] if callback else [],
    )
    module = M()
    trainer.fit(module, DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=12))
    sharded = [type(p).__name__ for p in module.parameters()]
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}  # a collective: every rank gathers
    records = [{k: v for k, v in r.items() if k != "layers"} for r in callback.audit.records] if callback else []
    torch.save({"weights": full, "sharded": sharded, "records": records},
               f"{out}/rank{trainer.global_rank}-{int(audited)}.pt")
"""


def _launch(folder, audited: bool) -> subprocess.Popen:
    """Run the script (Lightning re-runs it as rank 1), audited or not, writing into ``folder``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, str(folder / "train.py"), str(folder), str(int(audited))],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a timeout kills the whole group, Lightning's rank 1 included
    )


def _wait(proc: subprocess.Popen) -> str:
    """The output of ``proc``; its process group killed if it runs past 120 s."""
    try:
        return proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output = proc.communicate()[0]
        pytest.fail(f"timed out after 120 s:\n{output[-3000:]}")


def test_lightning_fsdp2_writes_one_run_folder_and_trains_identically(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    runs = [_launch(tmp_path, audited) for audited in (False, True)]  # both at once: half the wall time
    for proc in runs:
        output = _wait(proc)
        assert proc.returncode == 0, output[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["rank1"]
    result = {(r, a): torch.load(tmp_path / f"rank{r}-{a}.pt", weights_only=False) for r in (0, 1) for a in (0, 1)}
    for rank in (0, 1):
        plain, audited = result[rank, 0], result[rank, 1]
        assert set(plain["sharded"]) == set(audited["sharded"]) == {"DTensor"}  # FSDP2 really sharded them
        assert plain["weights"].keys() == audited["weights"].keys() and len(plain["weights"]) == 4
        for name, weight in plain["weights"].items():
            assert torch.equal(weight, audited["weights"][name]), f"rank {rank}: {name} differs"
    for name, weight in result[0, 0]["weights"].items():
        assert torch.equal(weight, result[1, 0]["weights"][name]), f"{name}: the ranks gathered different weights"
    r0 = stepaudit.load(tmp_path / "run").to_dict("records")
    r1 = stepaudit.load(tmp_path / "run" / "rank1").to_dict("records")
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == [0, 1, 2, 3]
    for a, b in zip(r0, r1):
        assert a["world_size"] == b["world_size"] == 2 and (a["rank"], b["rank"]) == (0, 1)
        assert a["verdict"] != "error" and b["verdict"] != "error", (a.get("error"), b.get("error"))
        for key in ("loss_before", "loss_after", "first_order", "verdict", "grad_norm", "update_norm"):
            assert a[key] == b[key], key  # the global objective and the norms completed from the shards, alike
        assert a["local_loss_before"] != b["local_loss_before"]  # each rank's own batch
        assert a["loss_before"] == pytest.approx((a["local_loss_before"] + b["local_loss_before"]) / 2, rel=1e-6)
    assert [r["loss_before"] for r in result[0, 1]["records"]] == [r["loss_before"] for r in r0]
    first = r0[0]  # SGD's first step has no momentum yet: Δw = -lr·g over the whole (unsharded) vector
    assert first["update_norm"] == pytest.approx(0.1 * first["grad_norm"], rel=1e-5)
    assert first["first_order"] == pytest.approx(-0.1 * first["grad_norm"] ** 2, rel=1e-5)
