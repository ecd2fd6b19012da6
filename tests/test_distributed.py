"""Real multi-process training on CPU: 2 processes, gloo backend, rendezvous on 127.0.0.1.

One torch.multiprocessing session runs all DDP cases (spawning processes is the expensive part on a
2-core machine); the FSDP case goes through the real launcher, `gptlab train --nproc 2`."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptlab import checkpoint
from gptlab.config import TrainConfig
from gptlab.data import TokenData
from gptlab.distributed import free_port
from gptlab.train import pretrain
from tests.conftest import load_gpt, tiny_train_config

# 4 sequences of 32 tokens per micro-batch; 512 tokens per step = 2 processes x 2 micro-batches = 1 x 4
GLOBAL = dict(batch_size=4, global_batch_tokens=512, max_steps=20, ckpt_interval=10, eval_interval=10,
              eval_batches=2)
DROPOUT_MODEL = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1}
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


# tiny models run fastest on one thread, and on a shared, loaded CPU every extra OpenMP thread waits for a
# time slice at each operation (seconds per step instead of milliseconds)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Stop(Exception):
    """Raised in every rank at the same point to interrupt a run, as a crash would."""


def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _column(run_dir, key: str) -> list[float]:
    return [float(row[key]) for row in _rows(run_dir) if row[key]]


def _ddp_worker(rank: int, port: int, jobs: list[tuple[TrainConfig, int | None]]) -> None:
    """One of 2 ranks: join the group, then run every job (cfg, stop after N batches drawn or None)."""
    os.environ.update(LOOPBACK, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # pretrain's session joins this group instead of creating one
    real_sample = TokenData.sample_batch
    try:
        for cfg, stop_after in jobs:
            drawn = []

            def sample(self, *args, stop_after=stop_after, drawn=drawn, **kwargs):
                drawn.append(1)
                if stop_after is not None and len(drawn) > stop_after:
                    raise _Stop
                return real_sample(self, *args, **kwargs)

            TokenData.sample_batch = sample
            with contextlib.suppress(_Stop):  # the stopped run's last checkpoint is what the next job resumes
                pretrain(cfg, log=lambda _: None)
    finally:
        TokenData.sample_batch = real_sample
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(data_dir, tmp_path_factory):
    """Three 2-process DDP runs: plain; with dropout; with dropout stopped after 10 steps, then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    plain = tiny_train_config(data_dir, root / "plain", **GLOBAL)
    straight = tiny_train_config(data_dir, root / "straight", **GLOBAL, model=DROPOUT_MODEL)
    split = tiny_train_config(data_dir, root / "split", **GLOBAL, model=DROPOUT_MODEL)
    resumed = tiny_train_config(data_dir, root / "split", **GLOBAL, model=DROPOUT_MODEL, resume=True)
    # 2 micro-batches per step in each process: stop while drawing the first batch of step 11
    jobs = [(plain, None), (straight, None), (split, 10 * 2), (resumed, None)]
    mp.spawn(_ddp_worker, args=(free_port(), jobs), nprocs=2, join=True)
    return root


def test_ddp_matches_one_process_with_the_same_global_batch(ddp_runs, data_dir, tmp_path):
    single = tiny_train_config(data_dir, tmp_path / "single", **GLOBAL)  # 4 micro-batches, 1 process
    pretrain(single, log=lambda _: None)
    ddp_loss, single_loss = _column(ddp_runs / "plain", "train_loss"), _column(tmp_path / "single", "train_loss")
    assert len(ddp_loss) == 20  # rank 0 alone writes the metrics
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)
    assert _column(ddp_runs / "plain", "val_loss")[-1] == pytest.approx(_column(tmp_path / "single", "val_loss")[-1],
                                                                        rel=1e-5)
    assert _column(ddp_runs / "plain", "tokens")[:2] == [512, 1024]  # tokens of both processes are counted


def test_ddp_resume_is_bit_identical(ddp_runs):
    """20 steps straight == 10 steps, crash, resume, 10 steps (2 processes, dropout on)."""
    straight, split = _rows(ddp_runs / "straight"), _rows(ddp_runs / "split")
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in straight]
    assert [r["val_loss"] for r in split] == [r["val_loss"] for r in straight]
    assert [r["step"] for r in split] == [str(s) for s in range(1, 21)]
    rng = checkpoint.load(ddp_runs / "split")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # per-rank dropout streams


def test_ddp_checkpoint_loads_in_one_process(ddp_runs):
    model, _ = load_gpt(ddp_runs / "plain")
    payload = checkpoint.load(ddp_runs / "plain")
    assert payload["step"] == 20 and payload["data"] == {"micro_batches_per_step": 4, "world_size": 2}
    assert torch.equal(model.transformer.wte.weight, payload["model"]["transformer.wte.weight"])


def test_fsdp_via_nproc_matches_one_process_and_resumes_anywhere(data_dir, tmp_path):
    """`gptlab train --nproc 2 --strategy fsdp` (torchrun underneath): same first-step loss and gradient
    norm as one process, and its gathered checkpoint resumes in a single process."""
    flags = ["--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
             "--global-batch-tokens", "256", "--max-steps", "4", "--eval-batches", "2", "--precision", "fp32",
             "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4"]
    run = tmp_path / "fsdp"
    result = subprocess.run([sys.executable, "-m", "gptlab", "train", "--nproc", "2", "--strategy", "fsdp",
                             "--data", str(data_dir), "--out", str(run), *flags],
                            capture_output=True, text=True, timeout=300, env={**os.environ, **LOOPBACK})
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == 4  # printed by rank 0 only

    single = tiny_train_config(data_dir, tmp_path / "single", batch_size=4, global_batch_tokens=256, max_steps=4,
                               warmup_steps=2, eval_batches=2)
    pretrain(single, log=lambda _: None)
    fsdp_rows, single_rows = _rows(run), _rows(tmp_path / "single")
    for key in ("train_loss", "grad_norm"):
        assert float(fsdp_rows[0][key]) == pytest.approx(float(single_rows[0][key]), rel=1e-5), key
    assert [float(r["train_loss"]) for r in fsdp_rows] == pytest.approx(
        [float(r["train_loss"]) for r in single_rows], rel=1e-5)

    # the checkpoint holds full tensors: one process continues the 2-process sharded run
    resumed = pretrain(tiny_train_config(data_dir, run, batch_size=4, global_batch_tokens=256, max_steps=6,
                                         warmup_steps=2, eval_batches=2, resume=True), log=lambda _: None)
    assert resumed["step"] == 6 and len(_rows(run)) == 6
    assert checkpoint.load(run)["data"]["world_size"] == 1
