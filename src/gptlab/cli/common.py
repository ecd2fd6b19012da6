"""What every sub-command module shares: the one-line argument errors and config-dataclass flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from gptlab.config import DEFAULT_RUN_FIELDS, DEFAULT_RUNS, PRESET_TRAINING, PRESET_TRAINING_FALLBACK


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + error
        self.exit(2, f"gptlab: error: {message}\n")


def fail(message: str) -> typing.NoReturn:
    print(f"gptlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_config_flags(
    parser: argparse.ArgumentParser, config_class: type, defaults: dict | None = None
) -> None:
    """One flag per config dataclass field (so the YAML keys and the flags can never drift apart)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = (defaults or {}).get(field.name, field.default)
        if default is None and field.name in DEFAULT_RUN_FIELDS:
            default = "the default run's: " + ", ".join(
                f"{run[field.name]} ({machine})" for machine, run in DEFAULT_RUNS.items()
            )
        if default is None and field.name in PRESET_TRAINING_FALLBACK:
            default = ", ".join(f"{run[field.name]} ({preset})" for preset, run in PRESET_TRAINING.items()) \
                + f", else {PRESET_TRAINING_FALLBACK[field.name]}"
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", default=None)
            continue
        base = hints[field.name]
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None -> X
            base = next(t for t in typing.get_args(base) if t is not type(None))
        if typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), help=f"default: {default}")
            continue
        parser.add_argument(flag, type=base, metavar=field.name.upper(), help=f"default: {default}")


def add_ckpt_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--ckpt of a command that loads a model: whatever gptlab.loading.load reads."""
    parser.add_argument("--ckpt", required=required, help="run directory, checkpoint file or HF GPT-2 directory")


def add_command_group(
    sub: argparse._SubParsersAction, name: str, help: str, parser_class: type
) -> argparse._SubParsersAction:
    """`gptlab NAME SUBCOMMAND ...`: a command that only groups sub-commands; add them to what this returns."""
    group = sub.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, parser_class=parser_class)


def config_flags(args: argparse.Namespace, config_class: type) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if f.name != "model"}


def print_summary(report: dict, *details: str) -> None:
    """A command's result as one JSON line on stdout, without its per-item `details` (the --out files hold
    those)."""
    print(json.dumps({k: v for k, v in report.items() if k not in details}, ensure_ascii=False))


def int_list(minimum: int, what: str) -> typing.Callable[[str], list[int]]:
    """An argparse type for comma-separated integers, each at least `minimum` ("1,4,16")."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} (each >= {minimum}), got {text!r}")
        return values

    return parse
