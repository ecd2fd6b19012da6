"""Sub-commands and flags of moderation: `gptlab moderate`, and the moderator flags `gptlab serve` shares."""

from __future__ import annotations

import argparse
import json

SAFE_LABEL = "ok"  # gptlab.moderation.SAFE_LABEL (not imported here: that would load torch for --help)


def add_moderator_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--moderator", default=default, metavar="NAME|CKPT",
                   help="profanity-check (alt-profanity-check's offline model) or the path of a "
                   "`gptlab finetune --task classify` checkpoint")
    p.add_argument("--moderation-threshold", type=float, default=0.5, metavar="P",
                   help="a category is flagged when its score reaches P, in (0, 1]")
    p.add_argument("--safe-label", default=SAFE_LABEL,
                   help="a classifier moderator's harmless label; its other labels are the categories")


def cmd_moderate(args: argparse.Namespace) -> None:
    from gptlab.moderation import Moderation, evaluate, load_moderator

    moderation = Moderation(load_moderator(args.moderator, args.safe_label), args.moderation_threshold)
    if args.eval:
        print(json.dumps(evaluate(moderation, args.eval, args.safe_label)))
        return
    for text, verdict in zip(args.text, moderation.check(args.text), strict=True):
        print(json.dumps({"text": text, **verdict.to_dict()}, ensure_ascii=False))


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("moderate", help="score texts with a moderator, or measure one on labelled data")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append", help="a text to screen (repeatable): one JSON verdict a line")
    what.add_argument("--eval", metavar="FILE.jsonl",
                      help='precision / recall of `flagged` on {"text","label"} records (labels other than '
                      "--safe-label are harmful), e.g. `gptlab data build hatespeech-id`'s test.jsonl")
    add_moderator_flags(p, "profanity-check")
    p.set_defaults(func=cmd_moderate)
