"""Sub-commands that apply models to tasks: predict (classify / tag / answer unlabelled inputs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptlab.cli.common import add_model_flags, choices_of
from gptlab.config import TrainConfig


def cmd_predict(args: argparse.Namespace) -> None:
    from gptlab.finetune.predict import predict_file
    from gptlab.outputs import atomic_file, check_new_output

    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device,
                  precision=args.precision)
    inputs = Path(args.input) if args.input else None
    if args.out is None:
        def write(result: dict) -> None:
            print(json.dumps(result, ensure_ascii=False), flush=True)

        predict_file(args.ckpt, inputs, args.text, write, **common)
        return
    check_new_output(args.out)
    with atomic_file(args.out) as handle:  # the file appears only once every prediction is in it
        count = predict_file(args.ckpt, inputs, args.text,
                             lambda r: handle.write(json.dumps(r, ensure_ascii=False) + "\n"), **common)
    print(json.dumps({"out": args.out, "predictions": count}), file=sys.stderr)


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("predict", help="labels, tags or answers for unlabelled inputs from a fine-tuned checkpoint")
    add_model_flags(p, quantize=False, ckpt_help="a classifier, tagger or language-model checkpoint")
    p.add_argument("--input", metavar="FILE.jsonl",
                   help='one input per line: {"text"} (classify, tag), {"tokens"} (tag), {"instruction"} or '
                        '{"messages"} (sft); other keys are ignored')
    p.add_argument("--text", action="append", metavar="TEXT", help="an input text (repeatable)")
    p.add_argument("--out", help="write the JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs predicted together")
    p.add_argument("--max-new-tokens", type=int, default=64, help="language models: the longest answer")
    p.add_argument("--precision", choices=choices_of(TrainConfig, "precision"), default="auto",
                   help="auto: bf16-mixed where the device runs bf16 natively, else fp32")
    p.set_defaults(func=cmd_predict)
