"""Typed, validated configuration: model presets and training hyperparameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptlab.errors import GptlabError


class ConfigError(GptlabError):
    """A configuration value is missing, malformed or out of range (reported to the user as one line)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load_yaml(yaml_path: str) -> dict[str, Any]:
    """A YAML file of settings, as a mapping."""
    path = Path(yaml_path)
    _check(path.is_file(), f"config file not found: {yaml_path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {yaml_path} is not valid YAML: {err}") from None
    _check(isinstance(loaded, dict), f"config file {yaml_path} must hold a mapping")
    return loaded


def _size(default: int, limit: int) -> Any:
    """A positive integer field with an upper bound beside it that catches typos (an extra zero) before they
    become an out-of-memory crash."""
    return field(default=default, metadata={"limit": limit})


# GPT-2's values of the fields that change the architecture beyond its sizes
GPT2_ARCHITECTURE: dict[str, Any] = {"pos_encoding": "learned", "norm_position": "pre", "bias": True, "qk_norm": False,
                                     "activation": "gelu", "tie_embeddings": True}


@dataclass
class GPTConfig:
    """Architecture of a decoder-only Transformer (GPT-1 / GPT-2 family)."""

    vocab_size: int = _size(50257, 1 << 20)
    block_size: int = _size(1024, 1 << 17)
    n_layer: int = _size(12, 1024)
    n_head: int = _size(12, 1024)
    n_embd: int = _size(768, 1 << 16)
    bias: bool = True
    dropout: float = 0.0
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] = "learned"
    norm_position: Literal["pre", "post"] = "pre"  # pre-LN is GPT-2, post-LN is GPT-1
    layer_norm_eps: float = 1e-5
    # past GPT-2 (the faster-learning recipe, docs/TRAINING.md; each switch measurable alone). A model with any
    # of them on is no longer GPT-2: `convert --to-hf` refuses it, the fused CPU decode step leaves it alone
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    activation: Literal["gelu", "relu2"] = "gelu"  # relu2: relu(x)^2 in the MLP (Primer; modded-nanoGPT)
    tie_embeddings: bool = True  # False: the LM head is its own matrix (zero-initialised)

    def __post_init__(self) -> None:
        for size in (f for f in dataclasses.fields(self) if "limit" in f.metadata):
            value, limit = getattr(self, size.name), size.metadata["limit"]
            _check(isinstance(value, int) and 0 < value <= limit,
                   f"model.{size.name} must be an integer in [1, {limit}], got {value!r}")
        _check(self.n_embd % self.n_head == 0,
               f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.pos_encoding in ("learned", "sinusoidal", "rotary"),
               f"model.pos_encoding must be 'learned', 'sinusoidal' or 'rotary', got {self.pos_encoding!r}")
        _check(self.pos_encoding != "rotary" or (self.n_embd // self.n_head) % 2 == 0,
               f"rotary positions need an even head size, got {self.n_embd // self.n_head}")
        _check(self.activation in ("gelu", "relu2"), f"model.activation must be 'gelu' or 'relu2', got {self.activation!r}")
        _check(isinstance(self.qk_norm, bool) and isinstance(self.tie_embeddings, bool),
               "model.qk_norm and model.tie_embeddings must be true or false")
        _check(self.norm_position in ("pre", "post"),
               f"model.norm_position must be 'pre' or 'post', got {self.norm_position!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def departures_from_gpt2(self) -> dict[str, Any]:
        """The fields where this architecture is not Hugging Face's GPT2LMHeadModel (empty: `convert --to-hf`
        can write it)."""
        return {name: getattr(self, name) for name, gpt2 in GPT2_ARCHITECTURE.items() if getattr(self, name) != gpt2}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        _check(not unknown, f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**values)


FASTER_ARCHITECTURE: dict[str, Any] = dict(pos_encoding="rotary", qk_norm=True, activation="relu2", tie_embeddings=False)
# training settings a preset brings, where the run leaves them unset (else PRESET_TRAINING_FALLBACK)
PRESET_TRAINING: dict[str, dict[str, Any]] = {name: dict(optimizer="muon", lr_schedule="wsd")
                                              for name in ("tiny-fast", "micro-fast")}
PRESET_TRAINING_FALLBACK: dict[str, Any] = dict(optimizer="adamw", lr_schedule="cosine")

PRESETS: dict[str, dict[str, Any]] = {
    # Sized so `gptlab train` with no arguments finishes on a 2-core CPU in under 10 minutes (DEFAULT_RUNS):
    # tiny where bf16 is native, micro (half the FLOPs per token) where the CPU trains in fp32
    "tiny": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=192),
    "micro": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "gpt1": dict(vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, norm_position="post",
                 dropout=0.1),
    # the faster-learning recipe (docs/TRAINING.md): the same sizes past GPT-2's architecture; with it come
    # Muon and the wsd schedule (PRESET_TRAINING), each of the six a switch of its own
    "tiny-fast": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=192, **FASTER_ARCHITECTURE),
    "micro-fast": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128, **FASTER_ARCHITECTURE),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}


# The default run, `gptlab train` with no arguments (on the bundled corpus), sized per machine class so that
# `make demo` finishes in under 10 minutes on 2 cores (measurements: docs/BENCHMARKS.md, "Default run"):
# - "native-bf16": a device that multiplies bf16 in hardware (CPUs with AVX512_BF16 or AMX, GPUs), trained in
#   bf16-mixed: the tiny preset on 7.4M tokens (5.1 epochs of the corpus); val_bpb 2.09 on a 2-core Zen 4;
# - "fp32": the rest, trained in fp32, where the same step runs ~4x slower (AVX2: ~4k tokens/s against ~17k):
#   the micro preset, which costs half the FLOPs per token, in smaller batches, which learn more per token.
DEFAULT_RUNS: dict[str, dict[str, Any]] = {
    "native-bf16": dict(preset="tiny", max_steps=1800, batch_size=16, lr=2e-3, warmup_steps=100, eval_interval=500),
    "fp32": dict(preset="micro", max_steps=3000, batch_size=4, lr=3e-3, warmup_steps=100, eval_interval=1000),
}
DEFAULT_RUN_FIELDS = ("preset", "max_steps", "batch_size", "lr", "warmup_steps", "eval_interval")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (pretraining or fine-tuning)."""

    preset: str | None = None  # None: the default run's (see DEFAULT_RUNS), like the other fields left at None
    model: dict[str, Any] = field(default_factory=dict)  # overrides on top of the preset
    data: str = "data/shakespeare"
    out: str = "runs/tiny"
    init: str | None = None  # a gptlab checkpoint or Hugging Face GPT-2 directory to start from
    # None: the default run's value for this machine class (DEFAULT_RUNS, resolved at the start of a run)
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    min_lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    # None: the preset's (PRESET_TRAINING), else adamw and cosine
    optimizer: Literal["adamw", "muon"] | None = None  # muon: Muon for the blocks' matrices, AdamW for the rest
    lr_schedule: Literal["cosine", "wsd"] | None = None  # wsd: warmup, constant, linear decay over the last 40%
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int | None = None
    eval_batches: int | None = None  # None: the full validation split
    ckpt_interval: int = 250
    seed: int = 1337
    device: str = "auto"
    # auto: bf16-mixed where the device multiplies bf16 natively, else fp32 (fp16-mixed on older GPUs); see device.py
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = "auto"
    resume: bool = False
    # scaling out (see docs/TRAINING.md); under torchrun, batch_size and grad_accum are per process
    strategy: Literal["ddp", "fsdp"] = "ddp"  # how several processes share the work: replicate or shard
    global_batch_tokens: int | None = None  # if set, grad_accum = this / (batch_size * block_size * processes)
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, more time
    logger: Literal["csv", "tensorboard"] = "csv"  # metrics.csv is always written; tensorboard adds event files
    peak_flops: float | None = None  # peak FLOP/s of one device, to report model FLOPs utilisation (MFU)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "ckpt_interval"):
            value, limit = getattr(self, name), 65536 if name in ("batch_size", "grad_accum") else 10**9
            _check(value is None and name in DEFAULT_RUN_FIELDS or isinstance(value, int) and 0 < value <= limit,
                   f"{name} must be an integer in [1, {limit}], got {value!r}")
        _check(self.warmup_steps is None or isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        _check(self.lr is None or 0 < self.lr <= 1.0, f"lr must be in (0, 1], got {self.lr}")
        lr = self.lr or min(run["lr"] for run in DEFAULT_RUNS.values())
        _check(0 <= self.min_lr <= lr, f"min_lr must be in [0, lr ({lr})], got {self.min_lr}")
        _check(0 <= self.weight_decay <= 10, f"weight_decay must be in [0, 10], got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        _check(self.eval_batches is None or self.eval_batches > 0,
               f"eval_batches must be positive, got {self.eval_batches}")
        _check(self.precision in ("auto", "fp32", "bf16-mixed", "fp16-mixed"),
               f"precision must be auto, fp32, bf16-mixed or fp16-mixed, got {self.precision!r}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        _check(self.strategy in ("ddp", "fsdp"), f"strategy must be ddp or fsdp, got {self.strategy!r}")
        _check(self.global_batch_tokens is None or (isinstance(self.global_batch_tokens, int)
                                                    and self.global_batch_tokens > 0),
               f"global_batch_tokens must be a positive integer, got {self.global_batch_tokens!r}")
        recipe = {**PRESET_TRAINING_FALLBACK, **PRESET_TRAINING.get(self.preset or "", {})}
        self.optimizer = self.optimizer or recipe["optimizer"]
        self.lr_schedule = self.lr_schedule or recipe["lr_schedule"]
        _check(self.optimizer in ("adamw", "muon"), f"optimizer must be adamw or muon, got {self.optimizer!r}")
        _check(self.lr_schedule in ("cosine", "wsd"), f"lr_schedule must be cosine or wsd, got {self.lr_schedule!r}")
        _check(self.logger in ("csv", "tensorboard"), f"logger must be csv or tensorboard, got {self.logger!r}")
        _check(self.peak_flops is None or self.peak_flops > 0, f"peak_flops must be positive, got {self.peak_flops}")
        for preset in [self.preset] if self.preset else {run["preset"] for run in DEFAULT_RUNS.values()}:
            GPTConfig.from_preset(preset, **self.model)  # validates preset and overrides early

    def default_run_fields(self) -> list[str]:
        """The fields the default run fills: those left at None, but the preset with --init (the model comes
        from that checkpoint)."""
        return [name for name in DEFAULT_RUN_FIELDS if getattr(self, name) is None and not (name == "preset" and self.init)]

    def with_default_run(self, machine: str) -> TrainConfig:
        """This config with default_run_fields() taken from DEFAULT_RUNS[machine]."""
        return dataclasses.replace(self, **{name: DEFAULT_RUNS[machine][name] for name in self.default_run_fields()})

    def model_config(self) -> GPTConfig:
        if self.preset is None:
            raise ConfigError("no preset: resolve the default run first (TrainConfig.with_default_run)")
        return GPTConfig.from_preset(self.preset, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, **flags: Any) -> TrainConfig:
        """Build from an optional YAML file, then flags (flags win; None means 'not given'). Model overrides
        merge key by key: `--n-layer 2` changes the file's `model.n_layer` and keeps its other model keys."""
        values: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
        given = {k: v for k, v in flags.items() if v is not None}
        if isinstance(values.get("model"), dict) and isinstance(given.get("model"), dict):
            given["model"] = {**values["model"], **given["model"]}
        values.update(given)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        _check(not unknown, f"unknown training config keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(str(err)) from None
