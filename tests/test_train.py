import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gptlab import checkpoint
from gptlab.cli import main
from gptlab.config import ConfigError
from gptlab.data import TokenData
from gptlab.model import GPT, linear_cross_entropy
from gptlab.optim import Muon, make_optimizer, orthogonalize
from gptlab.train import Task, fit, grad_accum_steps, lr_at, pretrain
from tests.conftest import tiny_model_config, tiny_train_config

# tiny models run fastest on one thread, and on a shared, loaded CPU every extra OpenMP thread waits for a
# time slice at each operation (seconds per step instead of milliseconds)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


def test_wsd_schedule_warms_up_holds_then_decays_linearly(tmp_path):
    cfg = tiny_train_config(tmp_path, tmp_path, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4,
                            lr_schedule="wsd")
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == lr_at(60, cfg) == pytest.approx(1e-3)  # stable until the last 40%
    assert lr_at(80, cfg) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tmp_path):
    model = GPT(tiny_model_config(tie_embeddings=False))
    optimizers = make_optimizer(model, tiny_train_config(tmp_path, tmp_path, optimizer="muon"), torch.device("cpu"))
    muon, adamw = optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert in_muon == {name for name, p in model.named_parameters() if p.dim() == 2 and ".h." in name}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_adamw == set(names.values()) - in_muon and "lm_head.weight" in in_adamw


def test_muon_computes_torchs_muon_update_and_orthogonalises_in_fp32():
    """In bf16 our Muon takes torch.optim.Muon's steps (match_rms_adamw); in fp32 (CPUs without native bf16)
    the same steps to bf16 precision, and the update's singular values land near 1."""
    torch.manual_seed(0)
    start, grads = torch.randn(48, 32), [torch.randn(48, 32) for _ in range(3)]
    results = {}
    for name, make in [("torch", lambda p: torch.optim.Muon([p], lr=0.02, weight_decay=0.1,
                                                           adjust_lr_fn="match_rms_adamw")),
                       ("bf16", lambda p: Muon([p], lr=0.02, weight_decay=0.1, dtype=torch.bfloat16)),
                       ("fp32", lambda p: Muon([p], lr=0.02, weight_decay=0.1))]:
        param = torch.nn.Parameter(start.clone())
        optimizer = make(param)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results[name] = param.detach()
    assert torch.equal(results["bf16"], results["torch"])
    assert (results["fp32"] - results["torch"]).abs().max() < 0.02 * 0.2 * math.sqrt(48) * 0.05
    singular = torch.linalg.svdvals(orthogonalize(torch.randn(64, 16)))
    assert singular.min() > 0.5 and singular.max() < 1.5  # the quintic's target band (not exactly 1)


def test_schedule_warms_up_then_decays(tmp_path):
    cfg = tiny_train_config(tmp_path, tmp_path, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_training_learns_and_writes_metrics_and_checkpoint(data_dir, tmp_path):
    result = pretrain(tiny_train_config(data_dir, tmp_path / "run", max_steps=30), log=lambda _: None)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result["val_bpb"] > 0 and math.isfinite(result["val_loss"])
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) / _bytes_per_token(data_dir),
                                              rel=0.25)
    payload = checkpoint.load(tmp_path / "run")
    assert payload["step"] == 30 and "optimizer" in payload and "tokenizer" in payload


def _bytes_per_token(data_dir) -> float:
    import json
    meta = json.loads((data_dir / "meta.json").read_text())
    return meta["val_bytes"] / meta["val_tokens"]


FASTER_LEARNING = dict(optimizer="muon", lr_schedule="wsd")  # the training switches of the tiny-fast recipe
FASTER_MODEL = {"pos_encoding": "rotary", "qk_norm": True, "activation": "relu2", "tie_embeddings": False}


@pytest.mark.parametrize("recipe", ["gpt2", "faster-learning"])
def test_interrupt_then_resume_reproduces_losses_exactly(data_dir, tmp_path, monkeypatch, recipe):
    """20 steps straight == 10 steps, Ctrl-C, --resume, 10 more (dropout on, so RNG state matters too); also
    with Muon (two optimizers' states in the checkpoint), the wsd schedule and the past-GPT-2 model switches."""
    model = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1}
    settings = dict(max_steps=20, ckpt_interval=10, model=model)
    if recipe == "faster-learning":
        settings.update(FASTER_LEARNING, model={**model, **FASTER_MODEL})
    pretrain(tiny_train_config(data_dir, tmp_path / "straight", **settings), log=lambda _: None)

    real_sample = TokenData.sample_batch
    calls = []

    def interrupted_after_ten_steps(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(TokenData, "sample_batch", interrupted_after_ten_steps)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_train_config(data_dir, tmp_path / "split", **settings), log=lambda _: None)
    assert checkpoint.load(tmp_path / "split")["step"] == 10
    monkeypatch.setattr(TokenData, "sample_batch", real_sample)
    pretrain(tiny_train_config(data_dir, tmp_path / "split", **settings, resume=True), log=lambda _: None)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(tiny_train_config(data_dir, tmp_path / "none", resume=True), log=lambda _: None)


def test_resume_with_settings_that_change_the_batches_is_refused(data_dir, tmp_path):
    """Seed, batch size, block size and micro-batches per step decide which batches a step draws: resuming a
    seed-7 run with --seed 99 (or another of them) would silently continue on other data. (Sinusoidal
    positions: a model of another block size has the same weights, only the data check tells them apart.)"""
    run = tmp_path / "run"
    model = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "pos_encoding": "sinusoidal"}
    pretrain(tiny_train_config(data_dir, run, max_steps=2, seed=7, model=model), log=lambda _: None)
    saved, metrics = (run / checkpoint.CKPT_NAME).read_bytes(), (run / "metrics.csv").read_text()
    for change, message in [({"seed": 99}, "seed 7, this run has 99"),
                            ({"batch_size": 8}, "batch_size 4, this run has 8"),
                            ({"model": {**model, "block_size": 16}}, "block_size 32, this run has 16"),
                            ({"grad_accum": 2}, r"micro-batches per step \(grad_accum or global_batch_tokens, x "
                                                r"processes\) 1, this run has 2")]:
        cfg = tiny_train_config(data_dir, run, **{"max_steps": 4, "seed": 7, "resume": True, "model": model, **change})
        with pytest.raises(ConfigError, match=f"--resume: the checkpoint was trained with {message}; resume with"):
            pretrain(cfg, log=lambda _: None)
    assert (run / checkpoint.CKPT_NAME).read_bytes() == saved and (run / "metrics.csv").read_text() == metrics
    (tmp_path / "run.yaml").write_text(json.dumps({"model": model}))  # JSON is YAML
    result = _gptlab("train", "--config", str(tmp_path / "run.yaml"), "--data", str(data_dir), "--out", str(run),
                     "--batch-size", "4", "--max-steps", "4", "--precision", "fp32", "--resume", "--seed", "99")
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "gptlab: error: --resume: the checkpoint was trained with seed 7, this run has 99; resume with the same "
        "setting (the batches it draws depend on it)")
    assert "Traceback" not in result.stderr and (run / checkpoint.CKPT_NAME).read_bytes() == saved


def test_init_from_checkpoint_keeps_weights(data_dir, tmp_path):
    pretrain(tiny_train_config(data_dir, tmp_path / "a", max_steps=5), log=lambda _: None)
    first = checkpoint.load(tmp_path / "a")["model"]
    pretrain(tiny_train_config(data_dir, tmp_path / "b", max_steps=1, lr=1e-9, min_lr=0.0, warmup_steps=0,
                               init=str(tmp_path / "a")), log=lambda _: None)
    second = checkpoint.load(tmp_path / "b")["model"]
    assert torch.allclose(first["transformer.h.0.mlp.c_fc.weight"], second["transformer.h.0.mlp.c_fc.weight"],
                          atol=1e-6)


def _fixed_batch(data_dir, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return TokenData(data_dir).sample_batch("train", rows, 32, torch.Generator().manual_seed(0))


def _one_step(data_dir, out, batch, micro_batches: int) -> tuple[float, list[torch.Tensor]]:
    """One optimizer step of fit() on `batch` cut into `micro_batches`; returns (loss, gradients)."""
    x, y = batch
    size = len(x) // micro_batches
    task = Task(sample_batch=lambda step, micro: (x[micro * size:(micro + 1) * size], y[micro * size:(micro + 1) * size]),
                evaluate=lambda model: {})
    cfg = tiny_train_config(data_dir, out, max_steps=1, batch_size=size, grad_accum=micro_batches, grad_clip=0.0)
    grads: list[torch.Tensor] = []

    def capture(optimizer, args, kwargs):  # the gradients the optimizer is about to apply
        grads.extend(p.grad.clone() for group in optimizer.param_groups for p in group["params"])

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=TokenData(data_dir).tokenizer.vocab_size))
    handle = register_optimizer_step_pre_hook(capture)
    try:
        result = fit(model, cfg, task, torch.device("cpu"), log=lambda _: None)
    finally:
        handle.remove()
    return result["train_loss"], grads


def test_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path):
    batch = _fixed_batch(data_dir, 8)
    big_loss, big_grads = _one_step(data_dir, tmp_path / "big", batch, micro_batches=1)
    acc_loss, acc_grads = _one_step(data_dir, tmp_path / "acc", batch, micro_batches=4)
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    assert len(acc_grads) == len(big_grads) > 0
    for acc, big in zip(acc_grads, big_grads, strict=True):
        assert (acc - big).abs().max() <= 1e-5 * big.abs().max()


def test_global_batch_tokens_sets_accumulation(data_dir, tmp_path):
    cfg = tiny_train_config(data_dir, tmp_path, batch_size=4, global_batch_tokens=4 * 32 * 6)
    assert grad_accum_steps(cfg, 32, 1) == 6 and grad_accum_steps(cfg, 32, 2) == 3
    with pytest.raises(ConfigError, match=r"multiple of batch_size x block_size x processes = 4 x 32 x 4 = 512"):
        grad_accum_steps(cfg, 32, 4)
    pretrain(tiny_train_config(data_dir, tmp_path / "run", batch_size=2, global_batch_tokens=2 * 32 * 3,
                               max_steps=2), log=lambda _: None)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert [int(row["tokens"]) for row in csv.DictReader(handle)] == [192, 384]


@pytest.mark.parametrize("chunk_size", [7, None])
def test_chunked_cross_entropy_matches_full_logits(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (50,))
    targets[::5] = -100  # ignored positions (padding, prompt tokens) count neither in loss nor gradient
    reference = F.cross_entropy(hidden @ weight.t(), targets)
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size)
    grads = torch.autograd.grad(2 * loss, (hidden, weight))  # backward scales by the incoming gradient
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, 2 * want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets, chunk_size).item() == pytest.approx(reference.item(),
                                                                                                 rel=1e-6)
    assert math.isnan(linear_cross_entropy(hidden, weight, torch.full((50,), -100), chunk_size).item())


def test_activation_checkpointing_and_bf16_train_the_same_model(data_dir, tmp_path):
    settings = dict(max_steps=4, eval_interval=4, ckpt_interval=4)
    plain = pretrain(tiny_train_config(data_dir, tmp_path / "plain", **settings), log=lambda _: None)
    recomputed = pretrain(tiny_train_config(data_dir, tmp_path / "ac", activation_checkpointing=True, **settings),
                          log=lambda _: None)
    assert _losses(tmp_path / "ac") == _losses(tmp_path / "plain")  # recomputation is exact
    assert recomputed["val_loss"] == plain["val_loss"]
    bf16 = pretrain(tiny_train_config(data_dir, tmp_path / "bf16", precision="bf16-mixed", **settings),
                    log=lambda _: None)
    assert _losses(tmp_path / "bf16") == pytest.approx(_losses(tmp_path / "plain"), rel=2e-2)
    assert bf16["val_loss"] == pytest.approx(plain["val_loss"], rel=2e-2)


def test_metrics_tensorboard_mfu_and_plot(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_train_config(data_dir, run, max_steps=4, eval_interval=2, logger="tensorboard", peak_flops=1e12),
             log=lambda _: None)
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"] and rows[1]["val_loss"] and not rows[0]["val_loss"]
    assert all(0 < float(row["mfu"]) < 1 and float(row["grad_norm"]) > 0 for row in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx([float(rows[1]["val_loss"]),
                                                                           float(rows[3]["val_loss"])])

    capsys.readouterr()
    main(["plot", str(run)])  # the CLI in this process: matplotlib is slow to import twice
    assert json.loads(capsys.readouterr().out)["out"] == str(run / "loss.png")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"gptlab: error: no metrics.csv in {tmp_path / 'nothing'} (is it a training run directory?)\n")


def _gptlab(*args: str) -> subprocess.CompletedProcess:
    """`gptlab` in a fresh process, on one thread like the in-process runs (same arithmetic, and fast)."""
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(data_dir, tmp_path):
    """A run killed with SIGKILL (no chance to clean up) leaves a loadable checkpoint; --resume continues
    from it and ends with exactly the losses of a run that was never killed."""
    flags = ["--data", str(data_dir), "--out", str(tmp_path / "killed"), "--block-size", "32", "--n-layer", "2",
             "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--max-steps", "60", "--ckpt-interval", "3",
             "--eval-interval", "1000", "--eval-batches", "2", "--precision", "fp32", "--warmup-steps", "5",
             "--lr", "3e-3", "--min-lr", "3e-4"]
    metrics = tmp_path / "killed" / "metrics.csv"
    process = subprocess.Popen([sys.executable, "-m", "gptlab", "train", *flags], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 14):  # header + 13 steps
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    saved = checkpoint.load(tmp_path / "killed")  # complete, never half-written
    assert saved["step"] % 3 == 0 and saved["step"] >= 12
    resumed = _gptlab("train", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'killed' / checkpoint.CKPT_NAME} at step {saved['step']}" in resumed.stdout
    assert [p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")] == []  # no temporary left

    straight = tiny_train_config(data_dir, tmp_path / "straight", max_steps=60, ckpt_interval=3, eval_interval=1000,
                                 eval_batches=2, warmup_steps=5)
    pretrain(straight, log=lambda _: None)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
