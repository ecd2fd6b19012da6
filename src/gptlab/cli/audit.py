"""`gptlab audit memorization | bias`: what a model memorised of its training data, and its biases."""

from __future__ import annotations

import argparse
import json

from gptlab.cli.common import add_ckpt_flag, add_command_group, fail, print_summary


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _finish(out: str | None, report: dict, plot, details: str) -> None:
    """OUT/<name>.json and OUT/<name>.png, written whole into a new directory (with --out), and the report
    without its per-item `details` on stdout."""
    from gptlab.outputs import atomic_directory

    if out is not None:
        with atomic_directory(out) as tmp:
            (tmp / f"{report['audit']}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
            plot(report, tmp / f"{report['audit']}.png")
    print_summary(report, details)


def cmd_memorization(args: argparse.Namespace) -> None:
    from gptlab import loading
    from gptlab.audit import memorization
    from gptlab.cleaning import Canary
    from gptlab.data import TokenData
    from gptlab.outputs import check_new_output

    if args.out:
        check_new_output(args.out)
    data = TokenData(args.data)
    loaded = loading.load(args.ckpt)
    if loaded.tokenizer.to_dict() != data.tokenizer.to_dict():
        fail(f"{args.data} was tokenized with another tokenizer than {args.ckpt}'s: audit the data it was trained on")
    model = loaded.gpt()
    report = {"audit": "memorization", "ckpt": str(args.ckpt), "data": str(args.data),
              "suffix_length": args.suffix_length, "windows": args.windows,
              "extraction": memorization.extraction_rates(model, data, args.prefix_lengths, args.suffix_length,
                                                          args.windows, args.seed)}
    canaries = [Canary(**c) for c in data.meta.get("canaries", [])]
    if canaries:
        report["canaries"] = memorization.canary_exposure(model, data.tokenizer, canaries, args.candidates, args.seed)
        report["canaries_by_repeats"] = memorization.by_repeats(report["canaries"])
    _finish(args.out, report, memorization.plot, "canaries")


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    asub = add_command_group(sub, "audit", "memorization (extraction rate, canary exposure) and bias audits",
                             parser_class)
    m = asub.add_parser("memorization", help="extraction rate of training vs held-out windows; canary exposure")
    add_ckpt_flag(m)
    m.add_argument("--data", required=True, help="the prepared dataset the model was trained on")
    m.add_argument("--prefix-lengths", type=_ints, default=[8, 16, 32], metavar="K,K,...",
                   help="prefix lengths k")
    m.add_argument("--suffix-length", type=int, default=16, metavar="N", help="tokens to reproduce")
    m.add_argument("--windows", type=int, default=200, metavar="N", help="windows per split")
    m.add_argument("--candidates", type=int, default=1000, metavar="N",
                   help="random secrets each canary is ranked against")
    m.add_argument("--seed", type=int, default=0, help="seed of the windows and the candidate secrets")
    m.add_argument("--out", help="directory for memorization.json and memorization.png")
    m.set_defaults(func=cmd_memorization)

    b = asub.add_parser("bias", help="counterfactual sentence pairs: log-likelihood gap per attribute with a "
                                     "bootstrap 95%% CI, share preferring the stereotype")
    add_ckpt_flag(b)
    b.add_argument("--lang", choices=("en", "zh"), default="en", help="bundled template set")
    b.add_argument("--templates", help="a template file of your own (see src/gptlab/audit/templates/bias_en.json)")
    b.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples")
    b.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    b.add_argument("--out", help="directory for bias.json and bias.png")
    b.set_defaults(func=cmd_bias)


def cmd_bias(args: argparse.Namespace) -> None:
    import sys

    from gptlab import loading
    from gptlab.audit import bias
    from gptlab.outputs import check_new_output

    if args.out:
        check_new_output(args.out)
    spec = bias.load_templates(args.lang, args.templates)
    model = loading.load(args.ckpt)
    report = {"audit": "bias", "ckpt": str(args.ckpt), "templates": args.templates or f"bundled:{args.lang}",
              **bias.audit_bias(model.gpt(), model.tokenizer, spec, args.bootstrap, args.seed)}
    print(bias.table(report), file=sys.stderr)
    _finish(args.out, report, bias.plot, "pairs")
