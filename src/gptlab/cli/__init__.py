"""The `gptlab` command line: one entry point; each module of this package registers its sub-commands.

A new capability adds a module here with `register(sub, parser_class)` and lists it in COMMANDS. Modules
import the library lazily inside each command, so `gptlab --help` does not load torch.
"""

from __future__ import annotations

import argparse
import sys

from gptlab.cli import apps, audit, evaluation, inference, interpret, moderation, training
from gptlab.cli.common import Parser, fail
from gptlab.errors import GptlabError

COMMANDS = (training, inference, evaluation, apps, moderation, interpret, audit)  # the order of `gptlab --help`


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptlab", description="GPT-style language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub, Parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except GptlabError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        fail(str(err) or type(err).__name__)
