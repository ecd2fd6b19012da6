"""One training loop for pretraining and fine-tuning: AdamW (or Muon beside it), warmup + cosine (or wsd), accumulation from a global
batch, clipping, mixed precision, torch.compile, activation checkpointing, data parallelism (DDP or
FSDP2 under torchrun), periodic evaluation, metrics, atomic checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gptlab import checkpoint, distributed, loading
from gptlab.config import ConfigError, TrainConfig
from gptlab.data import TokenData, prepare
from gptlab.device import autocast, resolve_precision, select_device
from gptlab.metrics import LM_METRICS, MetricsLog, mfu, model_flops_per_token
from gptlab.model import GPT, Block
from gptlab.optim import Optimizers, make_optimizer
from gptlab.tokenizer import Tokenizer

Batch = Any  # whatever the task's loss function takes; (x, y) for language modelling
DEFAULT_TOKENIZER = "bpe:4096"  # what `gptlab prepare` trains for the bundled corpus


WSD_DECAY = 0.4  # the share of the steps over which the "wsd" schedule decays (the last 40%)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then to cfg.min_lr at cfg.max_steps: a cosine ("cosine"), or, with "wsd"
    (warmup-stable-decay: the trapezoid of modded-nanoGPT), constant until the last WSD_DECAY of the steps,
    then linear."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "wsd":
        left = (cfg.max_steps - step) / max(1, WSD_DECAY * cfg.max_steps)
        return cfg.min_lr + min(1.0, max(0.0, left)) * (cfg.lr - cfg.min_lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step in each process: cfg.grad_accum, or what global_batch_tokens
    asks for (global batch = batch_size x block_size x grad_accum x processes tokens)."""
    if cfg.global_batch_tokens is None:
        return cfg.grad_accum
    per_micro_batch = cfg.batch_size * block_size * world_size
    if cfg.global_batch_tokens % per_micro_batch:
        raise ConfigError(f"global_batch_tokens ({cfg.global_batch_tokens}) must be a multiple of batch_size x "
                          f"block_size x processes = {cfg.batch_size} x {block_size} x {world_size} = {per_micro_batch}")
    return cfg.global_batch_tokens // per_micro_batch


def draw_generator(seed: int, draw: int) -> torch.Generator:
    """The random stream of the `draw`-th data draw of a run (a micro-batch, an epoch's order): computed from
    the seed and the draw's number alone, so a resumed run, or another process, draws exactly the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)



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
            _, loss = model(x.to(device), y.to(device))  # the chunked loss: no (tokens, vocab) logits
        nats += loss.item() * y.numel()
        tokens += y.numel()
        n_bytes += int(token_bytes[y].sum())
    model.train(was_training)
    loss = nats / max(1, tokens)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": nats / math.log(2) / max(1, n_bytes)}


@dataclass
class Task:
    """What a run trains on: the pieces that differ between pretraining and fine-tuning.

    `sample_batch(step, micro)` must be a pure function of its arguments: `micro` numbers the
    micro-batches of the whole global batch (process r of W, accumulating k, draws micro = r*k ... r*k+k-1),
    so every process gets its own slice of the data, the global batch is the same at any world size,
    and a resumed run continues with exactly the batches it would have seen.
    `loss(model, batch)` receives the model being trained, possibly wrapped by DDP or sharded by FSDP:
    call it (`model(...)`) rather than reaching into submodules, so gradients are synchronised.
    `evaluate(model)` runs on every process (FSDP needs all of them for a forward pass); rank 0 logs it."""

    sample_batch: Callable[[int, int], Batch]  # (step, micro_step) -> batch, deterministic for exact resume
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss
    count_tokens: Callable[[Batch], int] = batch_tokens
    extra_state: dict[str, Any] = field(default_factory=dict)  # saved in checkpoints (tokenizer, task info)
    metric_names: tuple[str, ...] = LM_METRICS  # the keys `evaluate` returns: the metrics.csv columns


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _silent(_: str) -> None:
    """The log of every rank but 0."""


def fit(model: GPT, cfg: TrainConfig, task: Task, device: torch.device, log: Callable[[str], None] = print,
        ) -> dict[str, Any]:
    """Train `model` on `task` for cfg.max_steps optimizer steps; resumes from cfg.out if cfg.resume.

    Under torchrun every process calls this; each trains on its own micro-batches (see Task) and only
    rank 0 logs, writes metrics and checkpoints."""
    with distributed.session(device) as world:
        if not world.is_main:
            log = _silent
        out = Path(cfg.out)
        ckpt_path = out / checkpoint.CKPT_NAME
        gpt = distributed.gpt_of(model)
        accum = grad_accum_steps(cfg, gpt.config.block_size, world.size)
        if cfg.resume and checkpoint.find(out) is None:
            raise ConfigError(f"--resume: no checkpoint in {out}")

        model.to(device)
        gpt.activation_checkpointing = cfg.activation_checkpointing
        if cfg.compile:  # block by block, in place: parameter names (and checkpoints) stay the same
            for module in model.modules():
                if isinstance(module, Block):
                    module.compile()
        mixed_dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else None
        train_model = distributed.parallelize(model, cfg.strategy, device, mixed_dtype)
        optimizer = make_optimizer(model, cfg, device)  # after FSDP, which replaces the parameters by shards
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16-mixed")
        progress = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
        if cfg.resume:
            progress = _resume(checkpoint.resolve(out), cfg, accum, train_model, optimizer, scaler, device, world, log)
        elif world.size > 1:
            torch.manual_seed(cfg.seed + world.rank)  # dropout masks differ between ranks (init is done)
        step = progress["step"]
        flops_per_token = model_flops_per_token(
            gpt.num_params() - (gpt.transformer.wpe.weight.numel() if "wpe" in gpt.transformer else 0),
            gpt.config.n_layer, gpt.config.n_embd, gpt.config.block_size)
        log(f"{world.size} process(es){f' ({cfg.strategy})' if world.size > 1 else ''}, "
            f"{accum} micro-batch(es) of {cfg.batch_size} per process and step, {cfg.precision}"
            f"{', compiled' if cfg.compile else ''}{', activation checkpointing' if cfg.activation_checkpointing else ''}")

        def save_checkpoint() -> None:
            model_state, optimizer_state = distributed.gather_state(train_model, optimizer)  # collectives:
            rng = distributed.gather_rng_states(device)  # every rank takes part, rank 0 writes
            if world.is_main:
                checkpoint.save(ckpt_path, {
                    "model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                    "model_config": gpt.config.to_dict(), "train_config": cfg.to_dict(), "rng": rng,
                    **progress, "data": {"micro_batches_per_step": accum * world.size, "world_size": world.size},
                    **task.extra_state,
                })
            distributed.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet

        metrics = (MetricsLog(out, step if cfg.resume else None, cfg.logger == "tensorboard", task.metric_names)
                   if world.is_main else None)
        model.train()
        train_loss, last, run_tokens, run_time = math.nan, {}, 0, 0.0
        run_start, elapsed_before = time.perf_counter(), progress["elapsed_s"]
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not world.is_main)
        try:
            while step < cfg.max_steps:
                started = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, tokens = 0.0, 0
                for micro in range(accum):
                    batch = _to_device(task.sample_batch(step, world.rank * accum + micro), device)
                    with distributed.grad_sync(train_model, micro == accum - 1):
                        with autocast(device, cfg.precision):
                            loss = task.loss(train_model, batch)
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.item()
                    tokens += task.count_tokens(batch)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum, tokens = distributed.all_reduce_sum([loss_sum, float(tokens)], device)
                train_loss = loss_sum / (accum * world.size)
                seconds = time.perf_counter() - started
                run_tokens, run_time = run_tokens + int(tokens), run_time + seconds
                progress = {"step": step, "tokens": progress["tokens"] + int(tokens),
                            "elapsed_s": elapsed_before + time.perf_counter() - run_start}  # wall clock
                tokens_per_s = tokens / seconds
                row = {"step": step, "tokens": progress["tokens"], "train_loss": train_loss, "lr": lr,
                       "grad_norm": distributed.full_norm(grad_norm), "tokens_per_s": tokens_per_s,
                       "mfu": mfu(flops_per_token, tokens_per_s, cfg.peak_flops, world.size),
                       "elapsed_s": progress["elapsed_s"]}
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    last = task.evaluate(distributed.unwrap(train_model))
                    row.update(last)
                    if world.is_main:
                        bar.write(f"step {step}: train_loss {train_loss:.4f} "
                                  + " ".join(f"{k} {v:.4f}" for k, v in last.items()))
                if metrics is not None:
                    metrics.write(row)
                if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                    save_checkpoint()
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                bar.update(1)
            if not last:  # resumed at max_steps: nothing trained, still report where the model stands
                last = task.evaluate(distributed.unwrap(train_model))
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return {"step": step, "train_loss": train_loss, **last,
                "tokens_per_s": run_tokens / run_time if run_time else 0.0, "checkpoint": str(ckpt_path)}


def _resume(path: Path, cfg: TrainConfig, accum: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Optimizers,
            scaler: torch.amp.GradScaler, device: torch.device, world: distributed.World, log: Callable[[str], None],
            ) -> dict[str, Any]:
    """Restore weights, optimizer, loss scaler, RNG states and progress; every rank reads the file."""
    payload = checkpoint.load(path)
    distributed.load_state(model, optimizer, payload["model"], payload["optimizer"])  # another model: refused
    _check_data_order(payload, cfg, distributed.gpt_of(model).config.block_size, accum * world.size)
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    rng = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
    if len(rng) == world.size:
        distributed.set_rng_state(rng[world.rank], device)
    else:  # data order stays exact (it depends on step and micro-batch only); dropout masks cannot
        log(f"checkpoint was written by {len(rng)} process(es), resuming with {world.size}: new RNG streams")
        torch.manual_seed(payload["train_config"]["seed"] + payload["step"] + world.rank)
    log(f"resumed from {path} at step {payload['step']}")
    return {"step": payload["step"], "tokens": payload.get("tokens", 0), "elapsed_s": payload.get("elapsed_s", 0.0)}


def _check_data_order(payload: dict[str, Any], cfg: TrainConfig, block_size: int, micro_batches: int) -> None:
    """A resumed run must draw the batches the interrupted one would have drawn (they depend on these
    settings, see Task): refuse rather than silently continue on another data order."""
    saved = payload.get("train_config", {})
    data = payload.get("data", {})
    pairs = {"seed": (saved.get("seed"), cfg.seed), "batch_size": (saved.get("batch_size"), cfg.batch_size),
             "block_size": (payload.get("model_config", {}).get("block_size"), block_size),
             "micro-batches per step (grad_accum or global_batch_tokens, x processes)":
                 (data.get("micro_batches_per_step"), micro_batches)}
    for name, (before, now) in pairs.items():
        if before is not None and before != now:
            raise ConfigError(f"--resume: the checkpoint was trained with {name} {before}, this run has {now}; "
                              "resume with the same setting (the batches it draws depend on it)")


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """A fresh model from the preset, or one initialised from a checkpoint / HF directory (--init)."""
    if cfg.init:
        init = loading.load(cfg.init)
        if init.tokenizer.vocab != tokenizer.vocab:
            raise ConfigError(f"--init {cfg.init} uses a different tokenizer than the data")
        return init.gpt()
    # the preset's vocab size is a default: the data's tokenizer decides
    return GPT(dataclasses.replace(cfg.model_config(), vocab_size=tokenizer.vocab_size))


def resolve(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> TrainConfig:
    """cfg as it runs on `device`, each choice said in the log: the precision ("auto": what the device runs
    natively) and the fields left to the default run of this machine class (config.DEFAULT_RUNS)."""
    precision, why = resolve_precision(cfg.precision, device)
    log(f"precision: {precision} ({why})")
    cfg = dataclasses.replace(cfg, precision=precision)
    unset = cfg.default_run_fields()
    if not unset:
        return cfg
    machine = "fp32" if precision == "fp32" else "native-bf16"
    cfg = cfg.with_default_run(machine)
    log(f"default run for a {machine} machine: " + ", ".join(f"{name} {getattr(cfg, name)}" for name in unset))
    return cfg


def pretrain(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`gptlab train`: prepare the bundled corpus if needed, build the model, run the loop
    (in every process when launched by torchrun)."""
    device = select_device(cfg.device)
    with distributed.session(device) as world:
        if not world.is_main:
            log = _silent
        cfg = resolve(cfg, device, log)
        data_dir = Path(cfg.data)
        if not (data_dir / "meta.json").is_file():
            if cfg.data != TrainConfig.data:
                raise ConfigError(f"no prepared dataset at {cfg.data} (run `gptlab prepare --out {cfg.data}`)")
            if world.is_main:
                log(f"preparing the bundled Shakespeare corpus in {data_dir}")
                prepare(None, DEFAULT_TOKENIZER, data_dir)
            distributed.barrier()
        data = TokenData(data_dir)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = build_model(cfg, data.tokenizer)
        log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
            f"{model.config.n_embd} wide, context {model.config.block_size}; device {device}")
        block = model.config.block_size
        micro_batches = grad_accum_steps(cfg, block, world.size) * world.size  # per step, all processes

        def sample_batch(step: int, micro: int) -> Batch:
            return data.sample_batch("train", cfg.batch_size, block, draw_generator(cfg.seed, step * micro_batches + micro))

        def evaluate(m: GPT) -> dict[str, float]:
            return evaluate_lm(m, data, max(8, cfg.batch_size), device, cfg.precision, cfg.eval_batches)

        task = Task(sample_batch=sample_batch, evaluate=evaluate,
                    extra_state={"tokenizer": data.tokenizer.to_dict()})
        return fit(model, cfg, task, device, log)
