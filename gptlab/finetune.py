"""Fine-tuning a pretrained GPT for a task: `gptlab finetune`, on the same loop as pretraining (`train.fit`).

Tasks
  sft       causal LM on prompt -> response; the loss covers response tokens only (prompt targets are -100)
  classify  a linear head on the final hidden state of the last real token (the <|endoftext|> appended
            to every text, as GPT-1 reads its "extract" token)
Methods
  full      every parameter trains
  lora      the base is frozen; low-rank adapters on the chosen linear layers train (gptlab.lora)
  freeze    only the top --train-layers blocks, the final LayerNorm and the classification head train
            (the SFT output matrix is tied to the token embedding, the bottom of the network, so it stays frozen)

Data: DIR/train.jsonl and DIR/val.jsonl (what `gptlab data build` writes), one JSON object per line:
  {"instruction": ..., "input": ... (optional), "output": ...}    instruction data (sft)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}    chat data (sft)
  {"text": ..., "label": ...}    classification
Both SFT formats are rendered through one chat template (an instruction with an input becomes the user
message "instruction\\n\\ninput"):

  ### System:\\n{content}\\n\\n          (if any; not trained)
  ### User:\\n{content}\\n\\n            (not trained)
  ### Assistant:\\n                     (not trained)
  {content}<|endoftext|>                (trained; the next message follows directly)

Batches are padded, not packed: each row is one example, right-padded with <|endoftext|> whose
targets are -100. Causal attention never looks right, so padding cannot change a real token's output.
Checkpoints hold only what training changes (the LoRA matrices, the unfrozen blocks, the head) plus the
path of the base model they apply to; runs from scratch (--from-scratch) save every weight.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import checkpoint, distributed, evaluate, hf, lora
from gptlab.checkpoint import CheckpointError
from gptlab.config import ConfigError, GPTConfig, TrainConfig, load_yaml
from gptlab.data import DataError
from gptlab.device import autocast, select_device
from gptlab.model import GPT, linear_cross_entropy
from gptlab.tokenizer import Tokenizer
from gptlab.train import Task, fit, grad_accum_steps, resolve

ROLES = ("system", "user", "assistant")
IGNORE = -100  # cross_entropy's ignore_index: positions that contribute no loss and no gradient
# `gptlab finetune` defaults where they differ from pretraining's (a YAML file or flags override them)
TRAIN_DEFAULTS: dict[str, Any] = dict(out="runs/finetune", max_steps=500, batch_size=16, lr=1e-3, min_lr=0.0,
                                      warmup_steps=20, weight_decay=0.0, eval_interval=100, ckpt_interval=100)


@dataclass
class FinetuneConfig:
    """What to adapt and how (the optimisation settings are the shared TrainConfig)."""

    task: Literal["sft", "classify"] = "sft"
    method: Literal["full", "lora", "freeze"] = "lora"
    train_layers: int = 1  # freeze: how many top blocks train (0: only the head)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj"  # comma-separated: attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj
    from_scratch: bool = False  # --init's architecture and tokenizer, freshly initialised weights (a baseline)
    lm_weight: float = 0.0  # classify: weight of the auxiliary next-token loss on the texts (GPT-1 uses 0.5)
    eval_items: int = 500  # validation items scored at each evaluation (0: all)
    max_new_tokens: int = 64  # generation length cap when scoring SFT

    def __post_init__(self) -> None:
        if self.task not in ("sft", "classify"):
            raise ConfigError(f"task must be sft or classify, got {self.task!r}")
        if self.method not in ("full", "lora", "freeze"):
            raise ConfigError(f"method must be full, lora or freeze, got {self.method!r}")
        for name in ("train_layers", "eval_items"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if isinstance(self.lm_weight, bool) or not isinstance(self.lm_weight, (int, float)) \
                or not 0 <= self.lm_weight <= 100:
            raise ConfigError(f"lm_weight must be in [0, 100], got {self.lm_weight}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.lora_config()  # validates the LoRA settings early

    def lora_config(self) -> lora.LoRAConfig:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return lora.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                               targets=targets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def configs_from_sources(yaml_path: str | None, train_flags: dict[str, Any], finetune_flags: dict[str, Any],
                         ) -> tuple[TrainConfig, FinetuneConfig]:
    """Fine-tuning defaults, then a YAML file (keys of either config), then flags (None = not given)."""
    finetune_keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    loaded = load_yaml(yaml_path) if yaml_path else {}
    train_values = {**TRAIN_DEFAULTS, **{k: v for k, v in loaded.items() if k not in finetune_keys},
                    **{k: v for k, v in train_flags.items() if v is not None}}
    finetune_values = {**{k: v for k, v in loaded.items() if k in finetune_keys},
                       **{k: v for k, v in finetune_flags.items() if v is not None}}
    try:
        return TrainConfig.from_sources(None, **train_values), FinetuneConfig(**finetune_values)
    except TypeError as err:
        raise ConfigError(str(err)) from None


# --- reading the data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    role: str
    content: str


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) for each non-blank line; anything else is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__ if key in record else 'nothing'}")
    return value


def sft_messages(record: dict[str, Any], where: str) -> list[Message]:
    """An instruction record or a chat record as a list of messages ending with the assistant's reply."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        result = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise DataError(f"{where}: message {i} needs a role of {', '.join(ROLES)}")
            if message["role"] == "system" and i > 0:
                raise DataError(f"{where}: only the first message may be a system message")
            result.append(Message(message["role"], _text(message, "content", f"{where}: message {i}")))
        if result[-1].role != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the response to learn)")
        return result
    if "instruction" in record and "output" in record:
        instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [Message("user", user), Message("assistant", _text(record, "output", where))]
    raise DataError(f"{where}: expected {{\"instruction\", \"input\", \"output\"}} or {{\"messages\"}}, "
                    f"got keys {sorted(record)}")


def classify_record(record: dict[str, Any], where: str) -> tuple[str, str]:
    if "text" not in record or "label" not in record:
        raise DataError(f"{where}: expected {{\"text\", \"label\"}}, got keys {sorted(record)}")
    text, label = _text(record, "text", where), record["label"]
    if not text:
        raise DataError(f"{where}: 'text' is empty")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be a string or an integer")
    return text, str(label)


# --- the chat template -----------------------------------------------------------------------------
def _header(role: str) -> str:
    return f"### {role.capitalize()}:\n"


def encode_chat(messages: list[Message], tokenizer: Tokenizer, generation_prompt: bool = False,
                ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained (assistant replies + EOT).

    Replies are encoded on their own, so the prompt tokens are exactly those a generation prompt gets.
    """
    ids: list[int] = []
    trained: list[bool] = []
    prompt = ""
    for message in messages:
        if message.role != "assistant":
            prompt += f"{_header(message.role)}{message.content}\n\n"
            continue
        prompt_ids = tokenizer.encode(prompt + _header("assistant"))
        reply_ids = tokenizer.encode(message.content) + [tokenizer.eot_id]
        ids += prompt_ids + reply_ids
        trained += [False] * len(prompt_ids) + [True] * len(reply_ids)
        prompt = ""
    if generation_prompt:
        prompt += _header("assistant")
    tail = tokenizer.encode(prompt) if prompt else []
    return ids + tail, trained + [False] * len(tail)


def render_chat(messages: list[Message], generation_prompt: bool = False) -> str:
    """The template as text (what encode_chat tokenizes), for reading and for prompting other tools."""
    text = "".join(f"{_header(m.role)}{m.content}" + ("<|endoftext|>" if m.role == "assistant" else "\n\n")
                   for m in messages)
    return text + (_header("assistant") if generation_prompt else "")


# --- examples and batches --------------------------------------------------------------------------
@dataclass
class SFTExample:
    ids: list[int]  # the whole conversation: prompt, reply, <|endoftext|>
    trained: list[bool]  # per token of ids: is it a target the loss covers
    prompt: list[int]  # everything before the final reply (what generation starts from)
    reference: str  # the final reply


@dataclass
class ClassifyExample:
    ids: list[int]
    label: int


def load_sft(path: str | Path, tokenizer: Tokenizer, block_size: int, log: Callable[[str], None] = print,
             ) -> list[SFTExample]:
    """Encode a file of instruction/chat records; conversations longer than the context are left out (counted)."""
    examples, too_long = [], 0
    for where, record in read_jsonl(path):
        messages = sft_messages(record, where)
        ids, trained = encode_chat(messages, tokenizer)
        if len(ids) > block_size + 1:  # inputs are ids[:-1], targets ids[1:]
            too_long += 1
            continue
        prompt, _ = encode_chat(messages[:-1], tokenizer, generation_prompt=True)
        examples.append(SFTExample(ids, trained, prompt, messages[-1].content))
    _report(path, len(examples), {f"longer than the {block_size}-token context (left out)": too_long}, log)
    return examples


def load_classify(path: str | Path, tokenizer: Tokenizer, block_size: int, labels: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[ClassifyExample], list[str]]:
    """Encode a file of {"text","label"} records; labels default to the sorted labels found (the training set).
    Texts longer than the context are cut to fit (counted)."""
    rows = [(where, *classify_record(record, where)) for where, record in read_jsonl(path)]
    if labels is None:
        labels = sorted({label for _, _, label in rows})
        if len(labels) < 2:
            raise DataError(f"{path}: a classifier needs at least two labels, found {labels}")
    index = {label: i for i, label in enumerate(labels)}
    examples, cut = [], 0
    for (where, _, label), ids in zip(rows, tokenizer.encode_batch([text for _, text, _ in rows]), strict=True):
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not one the model was trained on ({', '.join(labels)})")
        if len(ids) > block_size - 1:
            ids, cut = ids[: block_size - 1], cut + 1
        examples.append(ClassifyExample(ids + [tokenizer.eot_id], index[label]))
    _report(path, len(examples), {f"cut to the {block_size}-token context": cut}, log)
    return examples, labels


def _report(path: str | Path, kept: int, notes: dict[str, int], log: Callable[[str], None]) -> None:
    if kept == 0:
        raise DataError(f"{path}: no usable examples")
    extra = "".join(f", {count} {what}" for what, count in notes.items() if count)
    log(f"{path}: {kept} examples{extra}")


def sft_batch(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), right-padded to the longest example; untrained and padded targets are IGNORE."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids, trained = torch.tensor(example.ids), torch.tensor(example.trained)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, : len(ids) - 1] = torch.where(trained[1:], ids[1:], IGNORE)
    return x, y


def classify_batch(examples: list[ClassifyExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, index of each row's last real token, label ids)."""
    width = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        x[row, : len(example.ids)] = torch.tensor(example.ids)
    last = torch.tensor([len(e.ids) - 1 for e in examples])
    return x, last, torch.tensor([e.label for e in examples])


def in_batches(items: list, size: int) -> Iterator[list]:
    for first in range(0, len(items), size):
        yield items[first: first + size]


class EpochSampler:
    """Which examples make up micro-batch `micro` of optimizer step `step`: shuffled epochs drawn from the
    seed alone, so a resumed run sees exactly the batches an uninterrupted one would. `micro` numbers the
    micro-batches of the whole global batch (all processes, all accumulation steps; see train.Task)."""

    def __init__(self, n_examples: int, cfg: TrainConfig, block_size: int) -> None:
        self.n, self.cfg, self.block_size = n_examples, cfg, block_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._orders[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        processes = distributed.world().size  # asked inside fit, once the process group exists
        per_step = grad_accum_steps(self.cfg, self.block_size, processes) * processes
        size = self.cfg.batch_size
        start = (step * per_step + micro) * size
        return [self._order(p // self.n)[p % self.n] for p in range(start, start + size)]


# --- the model -------------------------------------------------------------------------------------
class FinetuneModel(nn.Module):
    """A GPT (possibly with LoRA layers) plus an optional classification head.

    With `partial_state`, state_dict() holds only the parameters that train: the base weights come from
    the base checkpoint, so adapter checkpoints stay small and load_state_dict expects just those keys.
    """

    def __init__(self, gpt: GPT, num_labels: int = 0, partial_state: bool = False) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config
        self.partial_state = partial_state
        self.head = nn.Linear(gpt.config.n_embd, num_labels) if num_labels else None
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)  # GPT's initialisation: small logits at the start
            nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.gpt(idx, targets)

    def classify(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Label logits (B, labels) from the hidden state of each row's last real token."""
        return self.classify_and_lm_loss(idx, last, with_lm_loss=False)[0]

    def classify_and_lm_loss(self, idx: torch.Tensor, last: torch.Tensor, with_lm_loss: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Label logits and, from the same forward pass, the next-token loss on each row's real tokens
        (GPT-1's auxiliary objective: the text's own language modelling keeps the features general)."""
        hidden = self.gpt.hidden_states(idx)
        logits = self.head(hidden[torch.arange(idx.size(0), device=idx.device), last])
        if not with_lm_loss:
            return logits, None
        # position j predicts token j + 1, which is real only while j < last (padding follows it)
        positions = torch.arange(idx.size(1) - 1, device=idx.device)
        targets = idx[:, 1:].masked_fill(positions >= last[:, None], IGNORE)
        return logits, linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.gpt.lm_head.weight, targets.flatten())

    def trainable_names(self, prefix: str = "") -> set[str]:
        return {prefix + name for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        if self.partial_state:
            keep = self.trainable_names(prefix)
            state = type(state)((k, v) for k, v in state.items() if k in keep)
        if destination is None:
            return state
        destination.update(state)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.partial_state:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        expected = self.trainable_names()
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n"
                               f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def prepare_model(gpt: GPT, cfg: FinetuneConfig, labels: list[str] | None, partial_state: bool) -> FinetuneModel:
    """Wrap `gpt` for the task and set what trains according to the method."""
    model = FinetuneModel(gpt, len(labels) if cfg.task == "classify" else 0, partial_state)
    if cfg.method == "lora":
        lora.apply_lora(gpt, cfg.lora_config())
    elif cfg.method == "freeze":
        blocks = gpt.transformer.h
        if cfg.train_layers > len(blocks):
            raise ConfigError(f"train_layers is {cfg.train_layers} but the model has {len(blocks)} blocks")
        gpt.requires_grad_(False)
        for block in blocks[len(blocks) - cfg.train_layers:]:
            block.requires_grad_(True)
        gpt.transformer.ln_f.requires_grad_(True)
    if model.head is not None:
        model.head.requires_grad_(True)
    return model


def _fingerprint(model: nn.Module) -> float:
    """A cheap checksum of the weights: tells whether a base checkpoint changed since an adapter was trained."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


# --- training --------------------------------------------------------------------------------------
def _split_path(data: str, split: str) -> Path:
    path = Path(data) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"no {split}.jsonl in {data} (build one with `gptlab data build NAME`, or write "
                        f"train.jsonl and val.jsonl yourself)")
    return path


def finetune(cfg: TrainConfig, ft: FinetuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`gptlab finetune`: load the base model, set up the method, build the task, run the shared loop."""
    if not cfg.init:
        raise ConfigError("finetune needs --init: the pretrained checkpoint (or HF GPT-2 directory) to adapt")
    train_path, val_path = _split_path(cfg.data, "train"), _split_path(cfg.data, "val")
    if ft.task == "sft":
        evaluate.require_metric_packages()
    device = select_device(cfg.device)
    cfg = resolve(cfg, device, log)
    gpt, tokenizer = checkpoint.load_model(cfg.init)
    block = gpt.config.block_size
    torch.manual_seed(cfg.seed)  # the same head / LoRA / from-scratch initialisation on resume
    base = None
    if ft.from_scratch:
        gpt = GPT(gpt.config)
    else:
        base = {"path": str(Path(cfg.init).resolve()), "fingerprint": _fingerprint(gpt)}
    labels = None
    if ft.task == "sft":
        train, val = load_sft(train_path, tokenizer, block, log), load_sft(val_path, tokenizer, block, log)
    else:
        train, labels = load_classify(train_path, tokenizer, block, log=log)
        val, _ = load_classify(val_path, tokenizer, block, labels, log=log)
    model = prepare_model(gpt, ft, labels, partial_state=base is not None)
    trainable, total = lora.count_parameters(model)
    log(f"{ft.task} / {ft.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%); "
        f"device {device}, {cfg.precision}")
    val = val[: ft.eval_items] if ft.eval_items else val
    if ft.task == "sft":
        task = sft_task(train, val, tokenizer, cfg, block, ft.max_new_tokens)
    else:
        task = classify_task(train, val, tokenizer, cfg, block, ft.lm_weight)
    task.extra_state = {"tokenizer": tokenizer.to_dict(),
                        "finetune": {"config": ft.to_dict(), "base": base, "labels": labels}}
    return fit(model, cfg, task, device, log)


def sft_task(train: list[SFTExample], val: list[SFTExample], tokenizer: Tokenizer, cfg: TrainConfig,
             block_size: int, max_new_tokens: int) -> Task:
    sampler = EpochSampler(len(train), cfg, block_size)
    pad = tokenizer.eot_id

    def sample_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sft_batch([train[i] for i in sampler.indices(step, micro)], pad)

    def evaluate_sft(model: FinetuneModel) -> dict[str, float]:
        return {"val_loss": response_loss(model, val, pad, cfg.batch_size, cfg.precision),
                **generation_scores(model, val, tokenizer, max_new_tokens, cfg.precision)}

    return Task(sample_batch=sample_batch, evaluate=evaluate_sft,
                metric_names=("val_loss", *evaluate.GENERATION_METRICS))


def classify_task(train: list[ClassifyExample], val: list[ClassifyExample], tokenizer: Tokenizer,
                  cfg: TrainConfig, block_size: int, lm_weight: float = 0.0) -> Task:
    sampler = EpochSampler(len(train), cfg, block_size)
    pad = tokenizer.eot_id

    def sample_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return classify_batch([train[i] for i in sampler.indices(step, micro)], pad)

    def loss(model: FinetuneModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, last, labels = batch
        logits, lm_loss = model.classify_and_lm_loss(x, last, with_lm_loss=lm_weight > 0)
        loss = F.cross_entropy(logits.float(), labels)
        return loss if lm_loss is None else loss + lm_weight * lm_loss

    def evaluate_classifier(model: FinetuneModel) -> dict[str, float]:
        scores = classification_scores(model, val, pad, cfg.batch_size, cfg.precision)
        return {"val_loss": scores.pop("loss"), **scores}

    return Task(sample_batch=sample_batch, evaluate=evaluate_classifier, loss=loss,
                metric_names=("val_loss", *evaluate.CLASSIFICATION_METRICS))


# --- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def response_loss(model: nn.Module, examples: list[SFTExample], pad_id: int, batch_size: int,
                  precision: str = "fp32") -> float:
    """Mean cross-entropy per response token (the quantity SFT minimises)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    for chunk in in_batches(examples, batch_size):
        x, y = (t.to(device) for t in sft_batch(chunk, pad_id))
        with autocast(device, precision):
            logits = model(x)[0]
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                reduction="sum").item()
        tokens += int((y != IGNORE).sum())
    model.train(was_training)
    return nats / max(1, tokens)


def generation_scores(model: nn.Module, examples: list[SFTExample], tokenizer: Tokenizer, max_new_tokens: int,
                      precision: str = "fp32") -> dict[str, float]:
    """Greedy replies to each example's prompt, scored against the reference reply."""
    outputs = evaluate.greedy_generate(model, [e.prompt for e in examples], tokenizer.eot_id, max_new_tokens,
                                       precision=precision)
    return evaluate.generation_metrics([tokenizer.decode(o) for o in outputs], [e.reference for e in examples])


def classification_scores(model: FinetuneModel, examples: list[ClassifyExample], pad_id: int, batch_size: int,
                          precision: str = "fp32") -> dict[str, float]:
    batches = (classify_batch(chunk, pad_id) for chunk in in_batches(examples, batch_size))
    predictions, references, loss = evaluate.classify(model, batches, precision)
    return {"loss": loss, "accuracy": evaluate.accuracy(predictions, references),
            "macro_f1": evaluate.macro_f1(predictions, references)}


# --- loading, merging, exporting -------------------------------------------------------------------
def load_finetuned(path: str | Path) -> tuple[FinetuneModel, Tokenizer, dict[str, Any]]:
    """A `gptlab finetune` checkpoint rebuilt on its base, or any other model as an untuned SFT model."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / checkpoint.CKPT_NAME).is_file():
        gpt, tokenizer = hf.load_hf(path)
        return FinetuneModel(gpt).eval(), tokenizer, {"config": FinetuneConfig(method="full").to_dict()}
    payload = checkpoint.load(path)
    if "finetune" not in payload:
        return (FinetuneModel(checkpoint.model_from_payload(payload)).eval(),
                Tokenizer.from_dict(payload["tokenizer"]), {"config": FinetuneConfig(method="full").to_dict()})
    return (*model_from_payload(payload), payload["finetune"])


def model_from_payload(payload: dict[str, Any]) -> tuple[FinetuneModel, Tokenizer]:
    info = payload["finetune"]
    config = GPTConfig.from_dict(payload["model_config"])
    base = info["base"]
    if base is None:
        gpt = GPT(config)
    else:
        gpt, _ = checkpoint.load_model(base["path"])
        if gpt.config != config or not math.isclose(_fingerprint(gpt), base["fingerprint"], rel_tol=1e-9):
            raise CheckpointError(f"the base model {base['path']} changed since this adapter was trained on it")
    model = prepare_model(gpt, FinetuneConfig(**info["config"]), info["labels"], partial_state=base is not None)
    checkpoint.load_weights(model, payload["model"])
    return model.eval(), Tokenizer.from_dict(payload["tokenizer"])


def standalone_gpt(payload: dict[str, Any]) -> tuple[GPT, Tokenizer]:
    """The plain GPT of an SFT checkpoint, LoRA merged in: what `gptlab generate` and `convert` load."""
    if payload["finetune"]["config"]["task"] != "sft":
        raise CheckpointError("this is a classifier checkpoint: score it with `gptlab eval-task`")
    model, tokenizer = model_from_payload(payload)
    if lora.lora_layers(model.gpt):
        lora.merge_lora(model.gpt)
    return model.gpt.requires_grad_(True), tokenizer


def merge_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """`gptlab merge-lora`: a self-contained full checkpoint of a fine-tuned run (LoRA merged in).

    SFT runs become ordinary gptlab checkpoints; classifiers stay fine-tuning checkpoints with every weight.
    """
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"output {out} already exists")
    payload = checkpoint.load(ckpt)
    if "finetune" not in payload:
        raise CheckpointError(f"{ckpt} is not a `gptlab finetune` checkpoint")
    info = payload["finetune"]
    if info["config"]["task"] == "sft":
        gpt, tokenizer = standalone_gpt(payload)
        checkpoint.save(out, {"model": gpt.state_dict(), "model_config": gpt.config.to_dict(),
                              "tokenizer": tokenizer.to_dict(), "step": payload["step"]})
        return {"out": str(out), "params": gpt.num_params()}
    model, tokenizer = model_from_payload(payload)
    if lora.lora_layers(model.gpt):
        lora.merge_lora(model.gpt)
    model.partial_state = False  # every weight, and no base to rebuild from
    checkpoint.save(out, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                          "tokenizer": tokenizer.to_dict(), "step": payload["step"],
                          "finetune": {**info, "config": {**info["config"], "method": "full"}, "base": None}})
    return {"out": str(out), "params": lora.count_parameters(model)[1]}


def export_peft(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """`gptlab export-lora`: OUT/base (HF GPT-2 export of the base model) + OUT/adapter (PEFT LoRA adapter)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output directory {out} exists and is not empty")
    payload = checkpoint.load(ckpt)
    info = payload.get("finetune")
    if info is None or info["config"]["method"] != "lora" or info["config"]["task"] != "sft":
        raise CheckpointError(f"{ckpt} is not a LoRA fine-tuning of a language model (--task sft --method lora)")
    model, tokenizer = model_from_payload(payload)
    base = copy.deepcopy(model.gpt)
    lora.remove_lora(base, merge=False)
    hf.save_hf(base, tokenizer, out / "base")
    lora_config = FinetuneConfig(**info["config"]).lora_config()
    lora.export_peft(model.gpt, lora_config, out / "adapter", base_model_path=(out / "base").resolve())
    trainable = sum(t.numel() for t in lora.adapter_state(model.gpt).values())
    return {"base": str(out / "base"), "adapter": str(out / "adapter"), "adapter_params": trainable}
