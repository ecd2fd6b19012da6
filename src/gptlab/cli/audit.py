"""`gptlab audit memorization | bias`: what a model memorised of its training data, and its biases."""

from __future__ import annotations

import argparse
import json

from gptlab.cli.common import fail


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _write(out: str | None, report: dict, plot) -> None:
    """OUT/<name>.json and OUT/<name>.png, written whole into a new directory."""
    from gptlab.outputs import atomic_directory

    if out is None:
        return
    with atomic_directory(out) as tmp:
        (tmp / f"{report['audit']}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        plot(report, tmp / f"{report['audit']}.png")


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
    _write(args.out, report, memorization.plot)
    print(json.dumps({k: v for k, v in report.items() if k != "canaries"}))


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("audit", help="memorization (extraction rate, canary exposure) and bias audits")
    asub = p.add_subparsers(dest="audit_command", required=True, parser_class=parser_class)
    m = asub.add_parser("memorization", help="extraction rate of training vs held-out windows; canary exposure")
    m.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
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
    b.add_argument("--ckpt", required=True, help="run directory, checkpoint file or HF GPT-2 directory")
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
    _write(args.out, report, bias.plot)
    print(bias.table(report), file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "pairs"}, ensure_ascii=False))
