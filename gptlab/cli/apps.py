"""Sub-commands that apply models to tasks: predict (classify / tag / answer unlabelled inputs), eval code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptlab.device import PRECISIONS


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


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return ks


def cmd_eval_code(args: argparse.Namespace) -> None:
    from gptlab import codegen
    from gptlab.cli.common import fail
    from gptlab.outputs import atomic_file, check_new_output
    from gptlab.sandbox import SandboxLimits

    if (args.ckpt is None) == (args.reference is None):
        fail("give either --ckpt CKPT (score its completions) or --reference canonical|pass (check the harness)")
    if args.samples < 1:
        fail(f"--samples must be at least 1, got {args.samples}")
    if args.out:
        check_new_output(args.out)
    limits = SandboxLimits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout)), memory_mb=args.memory_mb)
    tasks = codegen.load_tasks(args.tasks)
    tasks = tasks[: args.max_tasks] if args.max_tasks else tasks
    if args.reference:
        completions = codegen.reference_completions(tasks, args.reference)
    else:
        temperature = args.temperature if args.temperature is not None else (0.8 if args.samples > 1 else 0.0)
        completions = codegen.model_completions(args.ckpt, tasks, args.samples, temperature, args.top_p,
                                                args.max_new_tokens, args.seed)
    result = codegen.score(tasks, completions, args.k, limits, args.workers,
                           log=lambda m: print(m, file=sys.stderr))
    if args.out:
        with atomic_file(args.out) as handle:
            for row, samples in zip(result["per_task"], completions, strict=True):
                handle.write(json.dumps({**row, "completions": samples}) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_task"}))


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("predict", help="labels, tags or answers for unlabelled inputs from a fine-tuned checkpoint")
    p.add_argument("--ckpt", required=True, help="a classifier, tagger or language-model checkpoint")
    p.add_argument("--input", metavar="FILE.jsonl",
                   help='one input per line: {"text"} (classify, tag), {"tokens"} (tag), {"instruction"} or '
                        '{"messages"} (sft); other keys are ignored')
    p.add_argument("--text", action="append", metavar="TEXT", help="an input text (repeatable)")
    p.add_argument("--out", help="write the JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64, help="language models: the longest answer")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="evaluations that run what a model writes")
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=parser_class)
    e = esub.add_parser("code", help="pass@k of generated Python functions, executed in a sandbox")
    e.add_argument("--ckpt", help="the model whose completions are scored")
    e.add_argument("--reference", choices=["canonical", "pass"],
                   help="score the tasks' canonical solutions, or `pass` bodies, instead (harness self-check)")
    e.add_argument("--tasks", default="humaneval", help="humaneval, or a JSONL file of HumanEval-format tasks")
    e.add_argument("--samples", type=int, default=1, help="completions per task (n)")
    e.add_argument("-k", type=_ks, default=[1], help="comma-separated k of pass@k (each <= --samples)")
    e.add_argument("--temperature", type=float, help="default: 0 (greedy) for one sample, 0.8 for several")
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-tasks", type=int, help="only the first N tasks")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds per program (wall clock and CPU)")
    e.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    e.add_argument("--workers", type=int, default=2, help="programs run at once")
    e.add_argument("--out", help="per-task results and completions (JSONL)")
    e.set_defaults(func=cmd_eval_code)
