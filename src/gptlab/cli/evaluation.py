"""`gptlab eval ...`: perplexity of any text, few-shot in-context learning, lm-evaluation-harness in process,
pass@k of generated code (run in a sandbox). (`gptlab eval-task`, the fine-tuning tasks' metrics on a JSONL file, stays with the training commands.)"""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.cli.common import add_ckpt_flag, add_command_group, int_list, print_summary


def cmd_perplexity(args: argparse.Namespace) -> None:
    from gptlab.eval.perplexity import run

    print(json.dumps(run(args.ckpt, args.input, args.stride, args.batch_size, args.split)))


def cmd_icl(args: argparse.Namespace) -> None:
    from gptlab.eval.icl import IclConfig, run

    cfg = IclConfig(task=args.task, shots=args.shots, seeds=args.seeds, limit=args.limit, batch_size=args.batch_size,
                    calibrate=args.calibrate, max_new_tokens=args.max_new_tokens, out=args.out)
    for line in run(args.ckpt, cfg):
        print(json.dumps(line, ensure_ascii=False))


def cmd_tasks(args: argparse.Namespace) -> None:
    from gptlab.eval.tasks import builtin_tasks

    for name, task in builtin_tasks().items():
        print(f"{name:<20} {task.kind:<16} {task.metric:<12} {task.description}")


def cmd_harness(args: argparse.Namespace) -> None:
    from gptlab.eval.harness import run

    print(json.dumps(run(args.ckpt, args.tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size),
                     default=str))


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
    print_summary(result, "per_task")


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    esub = add_command_group(sub, "eval", "evaluate a model: perplexity, in-context learning, lm-evaluation-harness",
                             parser_class)

    e = esub.add_parser("perplexity", help="sliding-window perplexity and bits per byte of text files")
    add_ckpt_flag(e)
    e.add_argument("--input", nargs="+", required=True,
                   help="UTF-8 text files, directories of them, or prepared datasets (`gptlab prepare --out`)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: the model's context)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--split", default="val", help="the split of a prepared dataset")
    e.set_defaults(func=cmd_perplexity)

    e = esub.add_parser("icl", help="k-shot in-context learning: a metric against the number of demonstrations")
    add_ckpt_flag(e)
    e.add_argument("--task", required=True, help="a built-in task (`gptlab eval tasks`) or a task YAML file")
    e.add_argument("--shots", type=int_list(0, "numbers of demonstrations"), default=[0, 1, 2, 4, 8], help="comma-separated k")
    e.add_argument("--seeds", type=int, default=3, help="demonstration draws per k")
    e.add_argument("--limit", type=int, help="score only the first N queries")
    e.add_argument("--batch-size", type=int, default=16, help="prompts scored together")
    e.add_argument("--max-new-tokens", type=int, default=32, help="open tasks: longest answer")
    e.add_argument("--calibrate", action="store_true",
                   help="multiple choice: also report contextual calibration (Zhao et al. 2021)")
    e.add_argument("--out", help="directory for results.jsonl and curve.png (default: none written)")
    e.set_defaults(func=cmd_icl)

    e = esub.add_parser("tasks", help="list the built-in in-context-learning tasks")
    e.set_defaults(func=cmd_tasks)

    e = esub.add_parser("harness", help="lm-evaluation-harness tasks on a checkpoint, in process")
    add_ckpt_flag(e)
    e.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--include-path", help="directory of task YAMLs (and their local data files)")
    e.add_argument("--num-fewshot", type=int, help="demonstrations per prompt (default: each task's own)")
    e.add_argument("--limit", type=int, help="documents per task")
    e.add_argument("--batch-size", type=int, default=8, help="requests scored together")
    e.set_defaults(func=cmd_harness)

    e = esub.add_parser("code", help="pass@k of generated Python functions, executed in a sandbox")
    e.add_argument("--ckpt", help="the model whose completions are scored")
    e.add_argument("--reference", choices=["canonical", "pass"],
                   help="score the tasks' canonical solutions, or `pass` bodies, instead (harness self-check)")
    e.add_argument("--tasks", default="humaneval", help="humaneval, or a JSONL file of HumanEval-format tasks")
    e.add_argument("--samples", type=int, default=1, help="completions per task (n)")
    e.add_argument("-k", type=int_list(1, "positive integers"), default=[1], help="comma-separated k of pass@k (each <= --samples)")
    e.add_argument("--temperature", type=float, help="default: 0 (greedy) for one sample, 0.8 for several")
    e.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    e.add_argument("--max-new-tokens", type=int, default=256, help="the longest completion")
    e.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    e.add_argument("--max-tasks", type=int, help="only the first N tasks")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds per program (wall clock and CPU)")
    e.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    e.add_argument("--workers", type=int, default=2, help="programs run at once")
    e.add_argument("--out", help="per-task results and completions (JSONL)")
    e.set_defaults(func=cmd_eval_code)
