"""`gptlab eval icl`: few-shot in-context learning, a task's metric against the number of demonstrations k.

For every k and seed, each query gets k demonstrations drawn (seeded by seed, k and the query) from its pool,
which never holds the query itself. The prompt is

    [instruction + separator] demo_1 + separator + ... + demo_k + separator + input_template(query)

and a prompt that would not fit the context with its answer drops demonstrations, first ones first (counted
and reported). Multiple-choice tasks score every choice's answer_template by log-likelihood: `acc` picks the
highest total, `acc_norm` the highest per character (lm-eval's definitions); with calibration, `acc_calibrated`
divides each choice's probability by its probability after the content-free input "N/A" with the same
demonstrations (Zhao et al. 2021). Open tasks decode greedily (the shared engine) up to the separator and score
with gptlab's task metrics (gptlab.evaluate).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from gptlab import evaluate
from gptlab.eval import tasks
from gptlab.eval.tasks import Task, TaskError
from gptlab.generate import complete
from gptlab.language_model import LanguageModel
from gptlab.outputs import atomic_directory, check_new_output
from gptlab.sampling import SamplingConfig
from gptlab.scoring import continuation_request, score


@dataclass(frozen=True)
class IclConfig:
    task: str
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    seeds: int = 3
    limit: int | None = None
    batch_size: int = 16
    calibrate: bool = False
    max_new_tokens: int = 32
    out: str | None = None

    def __post_init__(self) -> None:
        if not self.shots or any(not isinstance(k, int) or k < 0 for k in self.shots):
            raise TaskError(f"--shots must be numbers >= 0, got {self.shots}")
        for name in ("seeds", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise TaskError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise TaskError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class Prompt:
    text: str
    dropped: int  # demonstrations left out to fit the context


def draw(pool: list[dict], k: int, seed: int, query_index: int, query: dict, shared: bool) -> list[dict]:
    """k demonstrations for one query; a pool shared with the queries skips the query's own record."""
    rng = random.Random(f"{seed}:{k}:{query_index}")
    candidates = [r for r in pool if r is not query] if shared else pool
    return rng.sample(candidates, k)


def build_prompt(task: Task, demos: list[dict], query_input: str, fits: Callable[[str], bool]) -> Prompt:
    """The k-shot prompt, without as many leading demonstrations as it takes to fit (`fits`)."""
    for dropped in range(len(demos) + 1):
        parts = [task.demonstration(d) for d in demos[dropped:]] + [task.query(query_input)]
        text = task.separator.join(([task.instruction] if task.instruction else []) + parts)
        if fits(text) or dropped == len(demos):
            return Prompt(text, dropped)
    raise AssertionError("unreachable")


def run(ckpt: str, cfg: IclConfig, log: Callable[[str], None] = print) -> Iterator[dict]:
    """Yield one JSON-able line per (k, seed) and one summary per k; print the table; write the curve."""
    task = tasks.load(cfg.task)
    out = check_new_output(cfg.out) if cfg.out else None
    if task.metric in ("chrf", "bleu", "rouge_l"):
        evaluate.require_metric_packages()
    queries, pool = task.load_examples()
    shared = pool is queries  # demonstrations come from the queries' own records: skip the query itself
    queries = queries[: cfg.limit] if cfg.limit else queries
    smallest = min(len(q["demos"]) for q in queries) if pool is None else len(pool) - shared
    if max(cfg.shots) > smallest:
        raise TaskError(f"k={max(cfg.shots)} is larger than the pool of {smallest} demonstrations of task {task.name}")
    for q in queries:
        if task.kind == "multiple-choice" and not (q.get("choices") or task.choices):
            raise TaskError(f"task {task.name}: a multiple-choice query needs choices (in the YAML or the record)")
    lm = LanguageModel.load(ckpt)
    lines, summaries = [], []
    for k in cfg.shots:
        runs = []
        for seed in range(cfg.seeds if k else 1):  # k = 0: every seed gives the same prompts
            scores, dropped = _evaluate(lm, task, queries, pool, k, seed, cfg, shared)
            line = {"task": task.name, "k": k, "seed": seed, **scores, "dropped_demonstrations": dropped,
                    "queries": len(queries)}
            runs.append(line)
            yield line
        summary = {"task": task.name, "k": k, "seeds": len(runs), "summary": True}
        for metric in (m for m in runs[0] if m in (*METRIC_KEYS, task.metric)):
            values = [r[metric] for r in runs]
            summary[metric] = statistics.fmean(values)
            summary[f"{metric}_std"] = statistics.pstdev(values)
        summary["dropped_demonstrations"] = sum(r["dropped_demonstrations"] for r in runs)
        if summary["dropped_demonstrations"]:
            log(f"k={k}: {summary['dropped_demonstrations']} demonstration(s) dropped in all to fit the context "
                f"({lm.model.config.block_size} tokens)")
        summaries.append(summary)
        lines += runs
        yield summary
    _table(summaries, task, log)
    if out is not None:
        with atomic_directory(out) as tmp:
            (tmp / "results.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n"
                                                       for x in lines + summaries))
            _plot(summaries, task, ckpt, tmp / "curve.png")
        log(f"wrote {out / 'results.jsonl'} and {out / 'curve.png'}")


METRIC_KEYS = ("acc", "acc_norm", "acc_calibrated")


def _evaluate(lm: LanguageModel, task: Task, queries: list[dict], pool: list[dict] | None, k: int, seed: int,
              cfg: IclConfig, shared: bool = False) -> tuple[dict[str, float], int]:
    tok, block = lm.tokenizer, lm.model.config.block_size
    demos = [draw(q["demos"] if pool is None else pool, k, seed, i, q, shared) for i, q in enumerate(queries)]
    if task.kind == "open":
        budget = block - cfg.max_new_tokens
        prompts = [build_prompt(task, d, q["input"], lambda t: len(tok.encode(t)) <= budget)
                   for q, d in zip(queries, demos, strict=True)]
        ids = [tok.encode(p.text)[-budget:] for p in prompts]
        configs = [SamplingConfig(temperature=0, max_new_tokens=cfg.max_new_tokens, stop=[task.separator])] * len(ids)
        completions = complete(lm.model, tok, ids, configs, max_batch=cfg.batch_size)
        predictions = [c.text.strip() for c in completions]
        score_value = getattr(evaluate, task.metric)(predictions, [q["answer"] for q in queries])
        return {task.metric: score_value}, sum(p.dropped for p in prompts)
    choices = [q.get("choices") or task.choices for q in queries]
    longest = [max(len(tok.encode(task.answer(c))) for c in cs) for cs in choices]
    prompts = [build_prompt(task, d, q["input"], lambda t, n=n: len(tok.encode(t)) + n <= block)
               for q, d, n in zip(queries, demos, longest, strict=True)]
    logliks = _choice_logliks(lm, task, [p.text for p in prompts], choices, cfg.batch_size, f"k={k} seed={seed}")
    answers = [cs.index(q["answer"]) if q["answer"] in cs else -1 for q, cs in zip(queries, choices, strict=True)]
    acc = [max(range(len(ll)), key=ll.__getitem__) for ll in logliks]
    norm = [max(range(len(ll)), key=lambda j, ll=ll, cs=cs: ll[j] / len(task.answer(cs[j])))
            for ll, cs in zip(logliks, choices, strict=True)]
    scores = {"acc": evaluate.accuracy(acc, answers), "acc_norm": evaluate.accuracy(norm, answers)}
    if cfg.calibrate:
        free = [build_prompt(task, d[p.dropped:], task.content_free, lambda _: True).text
                for d, p in zip(demos, prompts, strict=True)]
        base = _choice_logliks(lm, task, free, choices, cfg.batch_size, f"k={k} seed={seed} content-free")
        calibrated = [max(range(len(ll)), key=lambda j, ll=ll, b=b: ll[j] - b[j]) for ll, b in zip(logliks, base, strict=True)]
        scores["acc_calibrated"] = evaluate.accuracy(calibrated, answers)
    return scores, sum(p.dropped for p in prompts)


def _choice_logliks(lm: LanguageModel, task: Task, contexts: list[str], choices: list[list[str]], batch_size: int,
                    desc: str) -> list[list[float]]:
    """Total log-probability of each choice's answer text after its context."""
    tok, block = lm.tokenizer, lm.model.config.block_size
    requests, owners = [], []
    for i, (context, cs) in enumerate(zip(contexts, choices, strict=True)):
        context_ids = tok.encode(context)
        for c in cs:
            requests.append(continuation_request(context_ids, tok.encode(task.answer(c)), block))
            owners.append(i)
    with tqdm(total=len(requests), desc=desc, unit="choice", leave=False) as bar:
        scored = score(lm.model, requests, batch_size, bar.update)
    result: list[list[float]] = [[] for _ in contexts]
    for owner, s in zip(owners, scored, strict=True):
        result[owner].append(s.total)
    return result


def _table(summaries: list[dict], task: Task, log: Callable[[str], None]) -> None:
    metrics = [m for m in (*METRIC_KEYS, task.metric) if m in summaries[0]]
    metrics = list(dict.fromkeys(metrics))
    log(f"{task.name}: {task.metric} vs k (mean ± std over seeds)")
    log(f"{'k':>4} " + " ".join(f"{m:>18}" for m in metrics))
    for s in summaries:
        log(f"{s['k']:>4} " + " ".join(f"{s[m]:>10.4f} ± {s[m + '_std']:.4f}" for m in metrics))


def _plot(summaries: list[dict], task: Task, ckpt: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [s["k"] for s in summaries]
    for metric in dict.fromkeys(m for m in (*METRIC_KEYS, task.metric) if m in summaries[0]):
        ax.errorbar(ks, [s[metric] for s in summaries], yerr=[s[metric + "_std"] for s in summaries], marker="o",
                    capsize=3, label=metric)
    ax.set_xlabel("demonstrations in the prompt (k)")
    ax.set_ylabel(task.metric)
    ax.set_title(f"{task.name}: {Path(ckpt).name}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
