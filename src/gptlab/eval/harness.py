"""lm-evaluation-harness in process: `GptlabLM` is a native lm-eval model over gptlab's loader, batched scorer and
decoding engine, so any harness task runs on any checkpoint without a server and without converting it.

It subclasses lm-eval's TemplateLM, like the harness's own `hf` model, so requests are tokenized the way lm-eval
tokenizes them (context and continuation encoded together, then split; an empty context gets <|endoftext|>);
loglikelihood_rolling uses lm-eval's own rolling windows. Tasks are read offline: from --include-path (task YAMLs
whose data are local JSON/JSONL files) or lm-eval's registry; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from gptlab.eval.tasks import TaskError
from gptlab.generate import complete
from gptlab.language_model import LanguageModel
from gptlab.sampling import SamplingConfig
from gptlab.scoring import continuation_request, score

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _template_lm() -> type:
    os.environ.update(OFFLINE)  # before lm-eval imports `datasets`: never reach for the hub
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def make_lm(lm: LanguageModel, batch_size: int = 8) -> Any:
    """The lm-eval model of a loaded gptlab model (lm-eval is imported only when this is called)."""
    return _gptlab_lm_class()(lm, batch_size)


_CLASS: type | None = None


def _gptlab_lm_class() -> type:
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    class GptlabLM(_template_lm()):
        """lm-eval's three request types on gptlab's model: log-likelihoods through gptlab.scoring (batched,
        left-truncated to the context like lm-eval's hf model), generations through gptlab.generate.complete."""

        def __init__(self, lm: LanguageModel, batch_size: int = 8) -> None:
            super().__init__()
            self.lm, self.batch_size = lm, batch_size
            self.block = lm.model.config.block_size

        @property
        def eot_token_id(self) -> int:
            return self.lm.tokenizer.eot_id

        @property
        def max_length(self) -> int:
            return self.block

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.lm.tokenizer.encode(string)

        def tok_decode(self, tokens: list[int], **kwargs) -> str:
            return self.lm.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            batch = [continuation_request(context, continuation, self.block) for _, context, continuation in requests]
            with tqdm(total=len(batch), desc="loglikelihood", disable=disable_tqdm) as bar:
                scored = score(self.lm.model, batch, self.batch_size, bar.update)
            results = [(s.total, s.greedy) for s in scored]
            for (key, _, _), result in zip(requests, results, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            windows, owners = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        self.tok_encode(string), self.eot_token_id, self.block, context_len=1)):
                    windows.append((None, context, continuation))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
                totals[owner] += logprob
            for req, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            prompts, configs = [], []
            for context, gen_kwargs in (req.args for req in requests):
                kwargs = dict(gen_kwargs)
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
                cfg = SamplingConfig(max_new_tokens=min(max_new, self.block - 1), stop=until,
                                     temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0)
                ids = self.tok_encode(context) or [self.eot_token_id]
                prompts.append(ids[-(self.block - cfg.max_new_tokens):])  # keep the end, like lm-eval's hf model
                configs.append(cfg)
            completions = complete(self.lm.model, self.lm.tokenizer, prompts, configs, self.batch_size)
            texts = [c.text for c in completions]
            for req, text in zip(requests, texts, strict=True):
                self.cache_hook.add_partial("generate_until", req.args, text)
            return texts

    _CLASS = GptlabLM
    return GptlabLM


def evaluate(lm: LanguageModel, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` on the model; unknown tasks are a TaskError before any work."""
    _template_lm()
    from lm_eval import simple_evaluate

    if include_path is not None and not os.path.isdir(include_path):
        raise TaskError(f"--include-path {include_path} is not a directory")
    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskError(f"unknown lm-eval task {unknown[0]!r}" + ("" if include_path else
                        " (local tasks need --include-path DIR)"))
    return simple_evaluate(model=make_lm(lm, batch_size), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples, bootstrap_iters=0)


def _task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager for `tasks`. Indexing lm-eval's own ~15,000 task names takes 10-20 s; when every
    task is a plain task (not a group or tag) under include_path, that directory alone is indexed: a name
    there overrides lm-eval's own anyway, and a plain task needs no other entry of the index."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):  # lm-eval's name for plain tasks
            return local
    return TaskManager(include_path=include_path)


def run(ckpt: str, tasks: str, include_path: str | None = None, num_fewshot: int | None = None,
        limit: int | None = None, batch_size: int = 8, log: Callable[[str], None] = print) -> dict:
    """`gptlab eval harness`: lm-eval's results table, then (returned) lm-eval's `results`."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise TaskError("--tasks names no task")
    if batch_size < 1 or (limit is not None and limit < 1) or (num_fewshot is not None and num_fewshot < 0):
        raise TaskError("--batch-size and --limit must be at least 1, --num-fewshot at least 0")
    lm = LanguageModel.load(ckpt)
    results = evaluate(lm, names, include_path, num_fewshot, limit, batch_size)
    from lm_eval.utils import make_table

    log(make_table(results))
    return {"results": results["results"]}
