"""One training loop for pretraining and fine-tuning: AdamW, warmup + cosine, accumulation,
clipping, mixed precision, periodic evaluation, metrics.csv, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gptlab import checkpoint
from gptlab.config import ConfigError, TrainConfig
from gptlab.data import TokenData, prepare
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

Batch = Any  # whatever the task's loss function takes; (x, y) for language modelling
DEFAULT_TOKENIZER = "bpe:4096"  # what `gptlab prepare` trains for the bundled corpus
LM_METRICS = ("val_loss", "val_ppl", "val_bpb")  # what evaluate_lm reports


def select_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorm gains or other vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # the fused kernel does all parameters in one pass
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lm_loss(model: GPT, batch: Batch) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def batch_tokens(batch: Batch) -> int:
    return batch[0].numel()


@torch.no_grad()
def evaluate_lm(model: GPT, data: TokenData, batch_size: int, device: torch.device, precision: str,
                max_batches: int | None = None) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte (total nats / ln 2 / UTF-8 bytes of the targets)."""
    was_training = model.training
    model.eval()
    token_bytes = torch.from_numpy(data.tokenizer.token_bytes)
    nats, tokens, n_bytes = 0.0, 0, 0
    for i, (x, y) in enumerate(data.sequential_batches("val", batch_size, model.config.block_size)):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, precision):
            logits, _ = model(x.to(device))
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device),
                                                   reduction="sum")
        nats += losses.item()
        tokens += y.numel()
        n_bytes += int(token_bytes[y].sum())
    model.train(was_training)
    loss = nats / max(1, tokens)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": nats / math.log(2) / max(1, n_bytes)}


@dataclass
class Task:
    """What a run trains on: the pieces that differ between pretraining and fine-tuning."""

    sample_batch: Callable[[int, int], Batch]  # (step, micro_step) -> batch, deterministic for exact resume
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss
    count_tokens: Callable[[Batch], int] = batch_tokens
    extra_state: dict[str, Any] = field(default_factory=dict)  # saved in checkpoints (tokenizer, task info)
    metric_names: tuple[str, ...] = LM_METRICS  # the keys `evaluate` returns: the metrics.csv columns


class MetricsLog:
    """metrics.csv in the run directory, appended row by row (a resumed run continues the file)."""

    def __init__(self, path: Path, metric_names: tuple[str, ...] = LM_METRICS) -> None:
        self.path = path
        self.fields = ["step", "tokens", "train_loss", *metric_names, "lr", "tokens_per_s", "elapsed_s"]
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.fields)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def fit(model: GPT, cfg: TrainConfig, task: Task, device: torch.device, log: Callable[[str], None] = print,
        ) -> dict[str, Any]:
    """Train `model` on `task` for cfg.max_steps optimizer steps; resumes from cfg.out if cfg.resume."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / checkpoint.CKPT_NAME
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    step = 0
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint in {out}")
        payload = checkpoint.load(ckpt_path)
        checkpoint.load_weights(model, payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = payload["step"]
        torch.set_rng_state(payload["rng"]["torch"])
        if device.type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        log(f"resumed from {ckpt_path} at step {step}")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16-mixed")
    metrics = MetricsLog(out / "metrics.csv", task.metric_names)

    def save_checkpoint() -> None:
        checkpoint.save(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "model_config": model.config.to_dict(), "train_config": cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
            **task.extra_state,
        })

    model.train()
    start, tokens_seen, last = time.perf_counter(), 0, {}
    train_loss = float("nan")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = _to_device(task.sample_batch(step, micro), device)
                with autocast(device, cfg.precision):
                    loss = task.loss(model, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
                tokens_seen += task.count_tokens(batch)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_loss = loss_sum / cfg.grad_accum
            elapsed = time.perf_counter() - start
            tokens_per_s = tokens_seen / max(elapsed, 1e-9)
            row = {"step": step, "tokens": tokens_seen, "train_loss": train_loss, "lr": lr,
                   "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                last = task.evaluate(model)
                row.update(last)
                bar.write(f"step {step}: train_loss {train_loss:.4f} "
                          + " ".join(f"{k} {v:.4f}" for k, v in last.items()))
            metrics.write(row)
            if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                save_checkpoint()
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        raise
    bar.close()
    return {"step": step, "train_loss": train_loss, **last,
            "tokens_per_s": tokens_seen / max(time.perf_counter() - start, 1e-9), "checkpoint": str(ckpt_path)}


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """A fresh model from the preset, or one initialised from a checkpoint / HF directory (--init)."""
    if cfg.init:
        model, init_tokenizer = checkpoint.load_model(cfg.init)
        if init_tokenizer.vocab != tokenizer.vocab:
            raise ConfigError(f"--init {cfg.init} uses a different tokenizer than the data")
        return model
    # the preset's vocab size is a default: the data's tokenizer decides
    return GPT(dataclasses.replace(cfg.model_config(), vocab_size=tokenizer.vocab_size))


def pretrain(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`gptlab train`: prepare the bundled corpus if needed, build the model, run the loop."""
    data_dir = Path(cfg.data)
    if not (data_dir / "meta.json").is_file():
        if cfg.data != TrainConfig.data:
            raise ConfigError(f"no prepared dataset at {cfg.data} (run `gptlab prepare --out {cfg.data}`)")
        log(f"preparing the bundled Shakespeare corpus in {data_dir}")
        prepare(None, DEFAULT_TOKENIZER, data_dir)
    data = TokenData(data_dir)
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    model = build_model(cfg, data.tokenizer)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
        f"{model.config.n_embd} wide, context {model.config.block_size}; device {device}, {cfg.precision}")
    block = model.config.block_size

    def sample_batch(step: int, micro: int) -> Batch:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)
        return data.sample_batch("train", cfg.batch_size, block, generator)

    def evaluate(m: GPT) -> dict[str, float]:
        return evaluate_lm(m, data, max(8, cfg.batch_size), device, cfg.precision, cfg.eval_batches)

    task = Task(sample_batch=sample_batch, evaluate=evaluate,
                extra_state={"tokenizer": data.tokenizer.to_dict()})
    return fit(model, cfg, task, device, log)

