"""`gptlab inspect`: what a model computes on one prompt, as an HTML report, PNGs and JSON."""

from __future__ import annotations

import argparse
import json

from gptlab.cli.common import add_ckpt_flag


def cmd_inspect(args: argparse.Namespace) -> None:
    from gptlab import loading
    from gptlab.interpret.inspection import inspect_text
    from gptlab.interpret.report import write_report
    from gptlab.outputs import check_new_output

    check_new_output(args.out)  # before the model loads
    loaded = loading.load(args.ckpt)
    inspection = inspect_text(loaded.gpt(), loaded.tokenizer, args.prompt, args.target, args.corrupt,
                              ig_steps=args.ig_steps)
    print(json.dumps(write_report(inspection, args.out, source=str(args.ckpt))))


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("inspect", help="surprisal, attention, logit lens, attribution, patching and induction "
                                       "heads of one prompt: OUT/report.html, PNGs, report.json")
    add_ckpt_flag(p)
    p.add_argument("--prompt", required=True, help="the text to inspect")
    p.add_argument("--target", help="continuation whose log-probability is attributed and patched "
                                    "(default: the model's most likely next token)")
    p.add_argument("--corrupt", help="a prompt of as many tokens for activation patching")
    p.add_argument("--ig-steps", type=int, default=64, metavar="N", help="integrated gradients steps")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.set_defaults(func=cmd_inspect)
