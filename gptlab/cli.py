"""The `gptlab` command line: one entry point, one sub-command per capability."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from gptlab.config import DEFAULT_RUN_FIELDS, DEFAULT_RUNS, TrainConfig
from gptlab.datasets import SOURCES
from gptlab.device import PRECISIONS
from gptlab.errors import GptlabError
from gptlab.sampling import SamplingConfig

MODEL_FLAGS = {"block_size": int, "n_layer": int, "n_head": int, "n_embd": int, "dropout": float}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + error
        self.exit(2, f"gptlab: error: {message}\n")


def _fail(message: str) -> typing.NoReturn:
    print(f"gptlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type, defaults: dict | None = None) -> None:
    """One flag per config dataclass field (so the YAML keys and the flags can never drift apart)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = (defaults or {}).get(field.name, field.default)
        if default is None and field.name in DEFAULT_RUN_FIELDS:
            default = "the default run's: " + ", ".join(f"{run[field.name]} ({machine})" for machine, run in DEFAULT_RUNS.items())
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", default=None)
            continue
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), help=f"default: {default}")
            continue
        base = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))  # X | None -> X
        parser.add_argument(flag, type=base, metavar=field.name.upper(), help=f"default: {default}")


def _flags(args: argparse.Namespace, config_class: type) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if f.name != "model"}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of training settings (flags override it)")
    _add_config_flags(parser, TrainConfig)
    for name, kind in MODEL_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N", help="model override")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    flags = _flags(args, TrainConfig)
    model = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if model:
        flags["model"] = model
    return TrainConfig.from_sources(args.config, **flags)


def cmd_prepare(args: argparse.Namespace) -> None:
    from gptlab.data import prepare
    from gptlab.train import DEFAULT_TOKENIZER

    out = args.out or ("data/shakespeare" if not args.input else "data/custom")
    meta = prepare(args.input, args.tokenizer or DEFAULT_TOKENIZER, out, strict_utf8=args.strict_utf8)
    print(json.dumps({"out": out, **{k: v for k, v in meta.items() if k != "source"}}))


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
        _fail(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        _fail(f"--nproc must be at least 1, got {nproc}")
    if cfg.logger == "tensorboard":
        require_tensorboard()  # before any process starts
    if nproc > 1 and distributed.local_rank() is None:  # not yet under torchrun: become its launcher
        raise SystemExit(distributed.launch(nproc, _without_nproc(args.argv)))
    try:
        result = run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {cfg.out} is intact; continue with --resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    return result if os.environ.get("RANK", "0") == "0" else None


def cmd_train(args: argparse.Namespace) -> None:
    from gptlab.train import pretrain

    cfg = _train_config(args)
    result = _run_training(cfg, args, lambda: pretrain(cfg))
    if result is not None:
        print(json.dumps({k: result.get(k) for k in ("step", "val_loss", "val_bpb", "tokens_per_s", "checkpoint")}))


def cmd_plot(args: argparse.Namespace) -> None:
    from gptlab.metrics import plot

    print(json.dumps({"out": str(plot(args.run))}))


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "seed", "ignore_eos")


def cmd_finetune(args: argparse.Namespace) -> None:
    from gptlab.finetune.config import FinetuneConfig, configs_from_sources
    from gptlab.finetune.run import finetune

    cfg, ft = configs_from_sources(args.config, _flags(args, TrainConfig), _flags(args, FinetuneConfig))
    result = _run_training(cfg, args, lambda: finetune(cfg, ft))
    if result is not None:
        print(json.dumps(result))


def cmd_eval_task(args: argparse.Namespace) -> None:
    from gptlab.finetune.tasks import eval_task

    print(json.dumps(eval_task(args.ckpt, args.data, max_items=args.max_items, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, device=args.device, precision=args.precision)))


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from gptlab.finetune.artifacts import merge_checkpoint

    print(json.dumps(merge_checkpoint(args.ckpt, args.out)))


def cmd_export_lora(args: argparse.Namespace) -> None:
    from gptlab.finetune.artifacts import export_lora

    print(json.dumps(export_lora(args.ckpt, args.out)))


def cmd_data_build(args: argparse.Namespace) -> None:
    from gptlab.datasets import build

    print(json.dumps({"out": args.out or f"data/{args.name}", **build(args.name, args.out)}, ensure_ascii=False))


def cmd_generate(args: argparse.Namespace) -> None:
    from gptlab.generate import LanguageModel

    if args.stream and (len(args.prompt) > 1 or args.num_beams > 1):
        _fail("--stream takes a single --prompt and no --num-beams")
    sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    SamplingConfig(**sampling)  # bad values fail before the model loads
    lm = LanguageModel.load(args.ckpt, args.device, quantize=args.quantize)
    if args.stream:
        print(args.prompt[0], end="", flush=True)
        for piece in lm.stream(args.prompt[0], **sampling):
            print(piece, end="", flush=True)
        print()
        return
    outputs = lm.generate(args.prompt, num_beams=args.num_beams, length_penalty=args.length_penalty, **sampling)
    print("\n\n".join(prompt + output for prompt, output in zip(args.prompt, outputs, strict=True)))


def _load_for_serving(args: argparse.Namespace):
    import torch

    from gptlab.generate import LanguageModel

    if args.threads is not None:
        if args.threads < 1:
            _fail(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return LanguageModel.load(args.ckpt, args.device, quantize=args.quantize)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from gptlab.serve import ServeConfig, listen, serve
    except ImportError as err:
        _fail(f"serving needs the serve extra ({err.name} is missing): pip install 'gptlab[serve]'")
    path = Path(args.ckpt).resolve()
    name = args.model_name or (path.parent.name if path.is_file() else path.name)
    cfg = ServeConfig(model_name=name, api_key=args.api_key, max_batch_size=args.max_batch_size,
                      max_queue=args.max_queue)
    with listen(args.host, args.port) as sock:  # before loading the model: a busy port fails fast
        serve(_load_for_serving(args), cfg, sock, log_level=args.log_level)


def cmd_chat(args: argparse.Namespace) -> None:
    from gptlab import chat

    chat.main(_load_for_serving(args), system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_convert(args: argparse.Namespace) -> None:
    from gptlab import checkpoint, hf, loading
    from gptlab.outputs import check_new_output

    out = check_new_output(args.out)
    if args.from_hf:
        model, tokenizer = hf.load_hf(args.from_hf)
        checkpoint.save(out, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                              "tokenizer": tokenizer.to_dict(), "step": 0})
    else:
        loaded = loading.load(args.to_hf)
        model, tokenizer = loaded.gpt(), loaded.tokenizer
        hf.save_hf(model, tokenizer, out)
    print(json.dumps({"out": str(out), "params": model.num_params()}))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from gptlab import tokenizer as tok
    from gptlab.data import file_documents, list_text_files

    files = list_text_files(args.input)
    tokenizer = tok.train((d.text for d in file_documents(files)), args.vocab_size)
    tokenizer.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tokenizer.vocab_size}))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptlab", description="GPT-style language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token files")
    p.add_argument("--input", nargs="+", help="text files or directories (default: bundled Shakespeare)")
    p.add_argument("--tokenizer", help="gpt2 | DIR | bpe:VOCAB_SIZE (default: bpe:4096 trained on the corpus)")
    p.add_argument("--out", help="output directory (default: data/shakespeare)")
    p.add_argument("--strict-utf8", action="store_true",
                   help="refuse input with bytes that are not UTF-8 (default: replace them by U+FFFD, with a warning)")
    p.set_defaults(func=cmd_prepare)

    # no abbreviated flags: --nproc is removed from the command line handed to torchrun by exact name
    p = sub.add_parser("train", help="pretrain a model (defaults: tiny preset on Shakespeare)", allow_abbrev=False)
    _add_train_flags(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (launches torchrun; default: 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw a run's loss, learning rate and tokens/s into RUN/loss.png")
    p.add_argument("run", metavar="RUN", help="run directory (holds metrics.csv)")
    p.set_defaults(func=cmd_plot)

    from gptlab.finetune.config import TRAIN_DEFAULTS, FinetuneConfig

    p = sub.add_parser("finetune", help="adapt a pretrained model to a task (sft | classify; full | lora | freeze)")
    p.add_argument("--config", help="YAML file of training and fine-tuning settings (flags override it)")
    _add_config_flags(p, TrainConfig, TRAIN_DEFAULTS)
    _add_config_flags(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval-task", help="task metrics of a checkpoint on a JSONL file")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
    p.add_argument("--data", required=True, help="JSONL file ({text,label} or instruction/chat records)")
    p.add_argument("--max-items", type=int, help="score only the first N items")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16-mixed where the device runs bf16 natively, else fp32")
    p.set_defaults(func=cmd_eval_task)

    p = sub.add_parser("merge-lora", help="a full, self-contained checkpoint from a fine-tuning run")
    p.add_argument("--ckpt", required=True, help="a `gptlab finetune` run directory or checkpoint")
    p.add_argument("--out", required=True, help="output checkpoint file")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("export-lora", help="OUT/base (HF GPT-2) + OUT/adapter (PEFT) from a LoRA SFT run")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("data", help="example fine-tuning datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    d = dsub.add_parser("build", help="write NAME's train/val/test JSONL from an installed package")
    d.add_argument("name", choices=list(SOURCES), metavar="NAME", help=", ".join(SOURCES))
    d.add_argument("--out", help="output directory (default: data/NAME)")
    d.set_defaults(func=cmd_data_build)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="in [0, 2]; 0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p * p(most likely), in [0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=SamplingConfig.repetition_penalty,
                   help="> 1 discourages repeats (prompt too)")
    p.add_argument("--presence-penalty", type=float, default=SamplingConfig.presence_penalty, help="in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=SamplingConfig.frequency_penalty, help="in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[],
                   metavar="ID", help="stop token id (repeatable); <|endoftext|> stops unless --ignore-eos")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search instead of sampling")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: > 0 favours longer outputs")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights (CPU): faster, slightly less accurate")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a playground at /")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API")
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together; 1 turns batching off")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before requests get 429")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (small models decode faster on one)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights (CPU): faster, slightly less accurate")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
    p.add_argument("--system", help="system prompt (change it in the chat with /system TEXT)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply")
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="in [0, 2]; 0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (small models decode faster on one)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights (CPU): faster, slightly less accurate")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="Hugging Face GPT-2 <-> gptlab checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR")
    source.add_argument("--to-hf", metavar="CKPT")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE on text files")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except GptlabError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        _fail(str(err) or type(err).__name__)


if __name__ == "__main__":
    main()
