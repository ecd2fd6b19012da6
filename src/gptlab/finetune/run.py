"""`gptlab finetune`: load the base model, set up the method, build the task, run the shared training loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptlab import evaluate, loading, lora, prompts
from gptlab.config import ConfigError, TrainConfig
from gptlab.data import DataError
from gptlab.device import select_device
from gptlab.finetune.config import FinetuneConfig
from gptlab.finetune.data import load_classify, load_sft, load_tag, load_vqa
from gptlab.finetune.model import fingerprint, prepare_model
from gptlab.finetune.tasks import classify_task, sft_task, tag_task, vqa_task
from gptlab.model import GPT
from gptlab.train import fit, resolve
from gptlab.vision.pretrain import pretrain_tower


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
    elif ft.task == "tag":
        evaluate.require_seqeval()
    device = select_device(cfg.device)
    cfg = resolve(cfg, device, log)
    init = loading.load(cfg.init)
    gpt, tokenizer = init.gpt(), init.tokenizer
    block = gpt.config.block_size
    torch.manual_seed(cfg.seed)  # the same head / LoRA / from-scratch initialisation on resume
    base = None
    if ft.from_scratch:
        gpt = GPT(gpt.config)
    else:
        base = {"path": str(Path(cfg.init).resolve()), "fingerprint": fingerprint(gpt)}
    labels, style = None, prompts.get(ft.prompt_style)
    if ft.task == "sft":
        train, val = (load_sft(path, tokenizer, block, style, log) for path in (train_path, val_path))
    elif ft.task == "tag":
        train, labels = load_tag(train_path, tokenizer, block, ft.tag_context, log=log)
        val, _ = load_tag(val_path, tokenizer, block, ft.tag_context, labels, log=log)
    elif ft.task == "vqa":
        (train, train_pixels, train_labels), (val, val_pixels, val_labels) = (
            load_vqa(path, tokenizer, block, style, ft.vision_config(), log) for path in (train_path, val_path))
    else:
        train, labels = load_classify(train_path, tokenizer, block, log=log)
        val, _ = load_classify(val_path, tokenizer, block, labels, log=log)
    model = prepare_model(gpt, ft, labels, partial_state=base is not None, tokenizer=tokenizer)
    if ft.vision_pretrain_steps and not cfg.resume:  # a resumed run's checkpoint holds the pretrained tower
        if not any(train_labels):
            raise DataError(f"{train_path}: --vision-pretrain-steps needs records with image_labels (an object "
                            f"such as {{\"color\": \"blue\", \"shape\": \"circle\"}}: what the image shows)")
        pretrain_tower(model.vision.to(device), train_pixels, train_labels, ft.vision_pretrain_steps, cfg.batch_size,
                       cfg.lr, cfg.seed, (val_pixels, val_labels), log)
    trainable, total = lora.count_parameters(model)
    log(f"{ft.task} / {ft.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%); "
        f"device {device}, {cfg.precision}")
    val = val[: ft.eval_items] if ft.eval_items else val
    if ft.task == "sft":
        task = sft_task(train, val, tokenizer, style, cfg, block, ft.max_new_tokens)
    elif ft.task == "tag":
        task = tag_task(train, val, tokenizer, labels, cfg, block)
    elif ft.task == "vqa":
        task = vqa_task(train, train_pixels, val, val_pixels, tokenizer, style, cfg, block, ft.max_new_tokens,
                        ft.stage1_steps, ft.stage1_kinds())
    else:
        task = classify_task(train, val, tokenizer, cfg, block, ft.lm_weight)
    task.extra_state = {"tokenizer": tokenizer.to_dict(),
                        "finetune": {"config": ft.to_dict(), "base": base, "labels": labels},
                        **({"prompt_style": style.name} if ft.task in ("sft", "vqa") else {})}
    return fit(model, cfg, task, device, log)

