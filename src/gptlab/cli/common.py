"""What every sub-command module shares: the one-line argument errors, the help format that shows every
default, config-dataclass flags and the flags of the commands that load a model (one default each)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from gptlab.config import (
    DEFAULT_RUN_FIELDS,
    DEFAULT_RUNS,
    PRESET_TRAINING,
    PRESET_TRAINING_FALLBACK,
    TrainConfig,
)


def has_default(default: object) -> bool:
    """Whether --help shows a default: not for None, off or an empty list (they mean "not given"; 0 is shown)."""
    return not (default is None or default is False or default == [] or default == argparse.SUPPRESS)


def default_text(value: object) -> str:
    """"default: VALUE" as a user types it on the command line (a list as comma-separated values), escaped for
    argparse's %-formatting of help texts."""
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return "default: " + shown.replace("%", "%%")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, written once: argparse's default, unless it means "not given" or the help
    already explains it (a default that depends on other settings)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not has_default(action.default) or "default" in (action.help or ""):
            return action.help
        return f"{action.help} ({default_text(action.default)})"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        if not kwargs.get("help") and has_default(kwargs.get("default")):
            kwargs["help"] = default_text(kwargs["default"])  # argparse shows nothing of a flag without help
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + error
        self.exit(2, f"gptlab: error: {message}\n")


def fail(message: str) -> typing.NoReturn:
    print(f"gptlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_class: type,
    defaults: dict | None = None,
    skip: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """One flag per config dataclass field (so the YAML keys and the flags can never drift apart) but "model"
    and `skip`; `defaults`: the command's own defaults; `helps`: what a field is, shown before its default (a
    field with a help and no default shows only the help). The flags default to None (a flag not given leaves
    the YAML file's value), so the help text names the config's default."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name == "model" or field.name in skip:
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
        text = (helps or {}).get(field.name)
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
            continue
        shown = text if default is None and text else "; ".join(filter(None, (text, f"default: {default}")))
        base = hints[field.name]
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None -> X
            base = next(t for t in typing.get_args(base) if t is not type(None))
        if typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), help=shown)
            continue
        parser.add_argument(flag, type=base, metavar=field.name.upper(), help=shown)


def choices_of(config_class: type, name: str) -> tuple:
    """The values a Literal-typed config field accepts: the choices of a flag outside add_config_flags."""
    return typing.get_args(typing.get_type_hints(config_class)[name])


def add_ckpt_flag(parser: argparse.ArgumentParser, required: bool = True,
                  help: str = "run directory, checkpoint file or HF GPT-2 directory") -> None:
    """--ckpt of a command that loads a model: whatever gptlab.loading.load reads."""
    parser.add_argument("--ckpt", required=required, help=help)


def add_command_group(
    sub: argparse._SubParsersAction, name: str, help: str, parser_class: type
) -> argparse._SubParsersAction:
    """`gptlab NAME SUBCOMMAND ...`: a command that only groups sub-commands; add them to what this returns."""
    group = sub.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, parser_class=parser_class)


def config_flags(args: argparse.Namespace, config_class: type) -> dict:
    """The config's flags as given (None: not given; a field the command has no flag for counts as not given)."""
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_class) if f.name != "model"}


def add_model_flags(parser: argparse.ArgumentParser, quantize: bool = True, required: bool = True,
                    ckpt_help: str = "run directory, checkpoint file or HF GPT-2 directory") -> None:
    """--ckpt and --device (and --quantize) of every command that loads a model, with one default each."""
    add_ckpt_flag(parser, required, ckpt_help)
    parser.add_argument("--device", default=TrainConfig.device, help="cpu, cuda, mps or auto (the best one here)")
    if quantize:
        parser.add_argument("--quantize", choices=["int8"], help="int8 weights (CPU): faster, slightly less accurate")


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
