"""Sub-commands that make models: prepare, tokenizer, train, plot, finetune, eval-task, LoRA artifacts, data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from gptlab.cli.common import (
    add_command_group,
    add_config_flags,
    add_model_flags,
    choices_of,
    config_flags,
    fail,
    int_list,
)
from gptlab.config import TrainConfig
from gptlab.datasets import SOURCES

MODEL_FLAGS = {"block_size": int, "n_layer": int, "n_head": int, "n_embd": int, "dropout": float}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of training settings (flags override it)")
    add_config_flags(parser, TrainConfig)
    for name, kind in MODEL_FLAGS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, metavar=name.upper(), help="overrides the preset's"
        )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    flags = config_flags(args, TrainConfig)
    model = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if model:
        flags["model"] = model
    return TrainConfig.from_sources(args.config, **flags)


def cmd_prepare(args: argparse.Namespace) -> None:
    from gptlab.cleaning import CleanConfig
    from gptlab.data import prepare
    from gptlab.train import DEFAULT_TOKENIZER

    clean = CleanConfig(dedup=args.dedup, scrub_pii=args.scrub_pii, canaries=args.canaries,
                        canary_repeats=tuple(args.canary_repeats), seed=args.seed)
    inputs, extra = args.input, {}
    if args.corpus == "python":
        from gptlab.datasets import python_sources

        if args.input:
            fail("--corpus python takes no --input")
        files, skipped = python_sources()
        inputs, extra = [str(f) for f in files], {"python_files": len(files), "skipped": skipped}
    out = args.out or {"python": "data/python"}.get(args.corpus) or ("data/custom" if args.input else "data/shakespeare")
    meta = prepare(inputs, args.tokenizer or DEFAULT_TOKENIZER, out, strict_utf8=args.strict_utf8, clean=clean)
    shown = {k: v for k, v in meta.items() if k not in ("source", "canaries")}
    canaries = {"canaries": len(meta["canaries"])} if "canaries" in meta else {}
    print(json.dumps({"out": out, **shown, **canaries, **extra}))
def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _run_training(cfg: TrainConfig, args: argparse.Namespace, run: typing.Callable[[], dict]) -> dict | None:
    """Start or resume a run (never over an existing checkpoint without --resume), as torchrun's launcher
    when --nproc > 1; returns the result on rank 0 only (one summary line per run, not per process)."""
    from gptlab import checkpoint, distributed
    from gptlab.metrics import require_tensorboard

    if not cfg.resume and checkpoint.find(cfg.out):
        fail(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        fail(f"--nproc must be at least 1, got {nproc}")
    if cfg.logger == "tensorboard":
        require_tensorboard()  # before any process starts
    if nproc > 1 and distributed.local_rank() is None:  # not yet under torchrun: become its launcher
        raise SystemExit(distributed.launch(nproc, _without_nproc(args.argv)))
    try:
        result = run()
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the last checkpoint in {cfg.out} is intact; continue with --resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    return result if os.environ.get("RANK", "0") == "0" else None


def cmd_train(args: argparse.Namespace) -> None:
    from gptlab.train import pretrain

    cfg = _train_config(args)
    result = _run_training(cfg, args, lambda: pretrain(cfg))
    if result is not None:
        print(
            json.dumps(
                {k: result.get(k) for k in ("step", "val_loss", "val_bpb", "tokens_per_s", "checkpoint")}
            )
        )


def cmd_plot(args: argparse.Namespace) -> None:
    from gptlab.metrics import plot

    print(json.dumps({"out": str(plot(args.run))}))


def cmd_finetune(args: argparse.Namespace) -> None:
    from gptlab.finetune.config import FinetuneConfig, configs_from_sources
    from gptlab.finetune.run import finetune

    cfg, ft = configs_from_sources(
        args.config, config_flags(args, TrainConfig), config_flags(args, FinetuneConfig)
    )
    result = _run_training(cfg, args, lambda: finetune(cfg, ft))
    if result is not None:
        print(json.dumps(result))


def cmd_eval_task(args: argparse.Namespace) -> None:
    from gptlab.finetune.tasks import baseline_scores, eval_task

    if (args.ckpt is None) == (args.baseline is None):
        fail("give either --ckpt CKPT or --baseline lead|name|lexicon")
    if args.baseline:
        print(json.dumps(baseline_scores(args.data, args.baseline, args.max_items)))
        return

    print(
        json.dumps(
            eval_task(
                args.ckpt,
                args.data,
                max_items=args.max_items,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                device=args.device,
                precision=args.precision,
                blank_images=args.blank_images,
            )
        )
    )


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from gptlab.finetune.artifacts import merge_checkpoint

    print(json.dumps(merge_checkpoint(args.ckpt, args.out)))


def cmd_export_lora(args: argparse.Namespace) -> None:
    from gptlab.finetune.artifacts import export_lora

    print(json.dumps(export_lora(args.ckpt, args.out)))


def cmd_data_build(args: argparse.Namespace) -> None:
    from gptlab.datasets import build

    print(
        json.dumps({"out": args.out or f"data/{args.name}", **build(args.name, args.out)}, ensure_ascii=False)
    )


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from gptlab import tokenizer as tok
    from gptlab.data import file_documents, list_text_files

    files = list_text_files(args.input)
    tokenizer = tok.train((d.text for d in file_documents(files)), args.vocab_size)
    tokenizer.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tokenizer.vocab_size}))


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token files")
    p.add_argument("--input", nargs="+", help="text files or directories (default: bundled Shakespeare)")
    p.add_argument("--corpus", choices=["python"],
                   help="python: this interpreter's standard library, de-duplicated (PSF licence)")
    p.add_argument(
        "--tokenizer", help="gpt2 | DIR | bpe:VOCAB_SIZE (default: bpe:4096 trained on the corpus) | "
        "bpe-han:VOCAB_SIZE (each Chinese character one token)"
    )
    p.add_argument("--out", help="output directory (default: data/shakespeare; data/custom with --input, data/python "
                                 "with --corpus python)")
    p.add_argument(
        "--strict-utf8",
        action="store_true",
        help="refuse input with bytes that are not UTF-8 (without it: replace them by U+FFFD, with a warning)",
    )
    p.add_argument("--dedup", choices=("exact", "near"),
                   help="remove documents that repeat an earlier one: exactly, or also nearly (MinHash LSH)")
    p.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mails, phone numbers, IP addresses, card numbers and IBANs by <TYPE> placeholders")
    p.add_argument("--canaries", type=int, default=0, metavar="N",
                   help="insert N random secrets per repeat count into the training split (memorization audit)")
    p.add_argument("--canary-repeats", type=int_list(1, "positive integers"), default=[1, 4, 16, 64], metavar="R,R,...",
                   help="how often each group of canaries is inserted")
    p.add_argument("--seed", type=int, default=0, help="seed of the canaries")
    p.set_defaults(func=cmd_prepare)

    # no abbreviated flags: --nproc is removed from the command line handed to torchrun by exact name
    p = sub.add_parser(
        "train", help="pretrain a model (default: the default run's preset on Shakespeare)", allow_abbrev=False
    )
    _add_train_flags(p)
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes on this machine (launches torchrun)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw a run's loss, learning rate and tokens/s into RUN/loss.png")
    p.add_argument("run", metavar="RUN", help="run directory (holds metrics.csv)")
    p.set_defaults(func=cmd_plot)

    from gptlab.finetune.config import TRAIN_DEFAULTS, FinetuneConfig

    p = sub.add_parser(
        "finetune", help="adapt a pretrained model to a task (sft | classify | vqa; full | lora | freeze)"
    )
    p.add_argument("--config", help="YAML file of training and fine-tuning settings (flags override it)")
    # the model comes from --init: no --preset here, and the data is a directory of JSONL records
    add_config_flags(
        p,
        TrainConfig,
        {**TRAIN_DEFAULTS, "data": None},
        skip=("preset",),
        helps={
            "data": "required: a directory with train.jsonl and val.jsonl (`gptlab data build NAME` writes one)",
            "init": "required: the pretrained run, checkpoint or HF GPT-2 directory to adapt",
        },
    )
    add_config_flags(p, FinetuneConfig, helps={
        "lora_tokens": "lora: the tokens of this text train as whole embedding rows (PEFT's trainable_token_indices), "
                       "e.g. 0123456789 for a base that has hardly read digits",
        "stage1_steps": "vqa: the first N steps train only on the questions of --stage1-types (a curriculum)",
        "stage1_types": "vqa: comma-separated question types (the records' \"type\") of the first --stage1-steps",
        "vision_pretrain_steps": "vqa: steps that first train the vision tower alone on the records' image_labels "
                                 "(a linear head per attribute; docs/MULTIMODAL.md)",
        "freeze_vision_encoder": "vqa: the vision encoder does not train with the GPT (the projector does)",
    })
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval-task", help="task metrics of a checkpoint on a JSONL file")
    add_model_flags(p, quantize=False, required=False)
    p.add_argument("--baseline", choices=["lead", "name", "lexicon"],
                   help="instead of a model: the first line of each input (lead), or the words of the name it "
                        "defines (name), scored as the answer; for tag records, each word's most frequent tag "
                        "in the train.jsonl beside --data (lexicon)")
    p.add_argument("--data", required=True, help="JSONL file ({text,label} or instruction/chat records)")
    p.add_argument("--max-items", type=int, help="score only the first N items")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer (SFT data)")
    p.add_argument("--batch-size", type=int, default=32, help="items scored together")
    p.add_argument(
        "--precision",
        choices=choices_of(TrainConfig, "precision"),
        default="auto",
        help="auto: bf16-mixed where the device runs bf16 natively, else fp32",
    )
    p.add_argument("--blank-images", action="store_true",
                   help="vqa: replace every image by zeros (what the questions alone give away)")
    p.set_defaults(func=cmd_eval_task)

    p = sub.add_parser("merge-lora", help="a full, self-contained checkpoint from a fine-tuning run")
    p.add_argument("--ckpt", required=True, help="a `gptlab finetune` run directory or checkpoint")
    p.add_argument("--out", required=True, help="output checkpoint file")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("export-lora", help="OUT/base (HF GPT-2) + OUT/adapter (PEFT) from a LoRA SFT run")
    p.add_argument("--ckpt", required=True, help="a `gptlab finetune --method lora --task sft` run directory")
    p.add_argument("--out", required=True, help="output directory (never overwritten)")
    p.set_defaults(func=cmd_export_lora)

    dsub = add_command_group(sub, "data", "example fine-tuning datasets", parser_class)
    d = dsub.add_parser("build", help="write NAME's train/val/test JSONL from an installed package")
    d.add_argument("name", choices=list(SOURCES), metavar="NAME", help=", ".join(SOURCES))
    d.add_argument("--out", help="output directory (default: data/NAME)")
    d.set_defaults(func=cmd_data_build)

    tsub = add_command_group(sub, "tokenizer", "tokenizer tools", parser_class)
    t = tsub.add_parser("train", help="train a byte-level BPE on text files")
    t.add_argument("--input", nargs="+", required=True, help="text files or directories")
    t.add_argument("--vocab-size", type=int, required=True, help="size of the vocabulary")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=cmd_tokenizer_train)
