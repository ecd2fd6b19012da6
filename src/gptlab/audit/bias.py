"""Counterfactual bias audit: `gptlab audit bias`.

A template file (src/gptlab/audit/templates/bias_{en,zh}.json, or the user's own) lists attributes; each has
templates with a `{term}` and a `{group}` slot and pairs [term, stereotyped group, other group]. Every
template x pair gives two sentences that differ only in the group; the model scores each by its
log-likelihood (summed over the sentence's tokens, after <|endoftext|>). Per attribute the audit reports
the mean gap (stereotyped minus other, nats) with a bootstrap 95% confidence interval, and the share of
pairs where the model prefers the stereotyped sentence (the CrowS-Pairs statistic; 0.5 = no preference).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.scoring import score
from gptlab.tokenizer import Tokenizer

LANGUAGES = ("en", "zh")


class TemplateError(GptlabError):
    """A bias template file that is missing or malformed."""


def load_templates(lang: str = "en", path: str | Path | None = None) -> dict:
    """The bundled templates of `lang`, or the file at `path`, checked for the fields the audit reads."""
    try:
        if path is None:
            text = (resources.files("gptlab.audit") / "templates" / f"bias_{lang}.json").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        raise TemplateError(f"cannot read bias templates {path or lang}: {err}") from None
    attributes = spec.get("attributes") if isinstance(spec, dict) else None
    if not attributes:
        raise TemplateError(f"{path or lang}: expected {{\"attributes\": [{{\"name\", \"templates\", \"pairs\"}}, ...]}}")
    for attr in attributes:
        name = attr.get("name", "?")
        if not attr.get("templates") or not all("{term}" in t and "{group}" in t for t in attr["templates"]):
            raise TemplateError(f"{path or lang}: attribute {name!r} needs templates with {{term}} and {{group}}")
        if not attr.get("pairs") or not all(isinstance(p, list) and len(p) == 3 for p in attr["pairs"]):
            raise TemplateError(f"{path or lang}: attribute {name!r} needs pairs [term, stereotyped group, other group]")
    return spec


def sentence_scores(model: GPT, tokenizer: Tokenizer, sentences: list[str]) -> np.ndarray:
    """Each sentence's log-likelihood (nats) after <|endoftext|>."""
    requests = [([tokenizer.eot_id, *tokenizer.encode(s)], 1) for s in sentences]
    return np.array([scored.total for scored in score(model, requests, batch_size=64)], dtype=np.float64)


def bootstrap_ci(values: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def audit_bias(model: GPT, tokenizer: Tokenizer, spec: dict, samples: int = 2000, seed: int = 0) -> dict:
    """{"attributes": [{name, pairs, mean_gap, ci_low, ci_high, stereotyped_share}], "pairs": [...]}"""
    model.eval()
    rows, results = [], []
    for attr in spec["attributes"]:
        stereo, other, items = [], [], []
        for template in attr["templates"]:
            for term, stereotyped, counter in attr["pairs"]:
                stereo.append(template.format(term=term, group=stereotyped))
                other.append(template.format(term=term, group=counter))
                items.append(term)
        gaps = sentence_scores(model, tokenizer, stereo) - sentence_scores(model, tokenizer, other)
        low, high = bootstrap_ci(gaps, samples, seed)
        results.append({"name": attr["name"], "pairs": len(gaps), "mean_gap": round(float(gaps.mean()), 4),
                        "ci_low": round(low, 4), "ci_high": round(high, 4),
                        "stereotyped_share": round(float((gaps > 0).mean()), 4)})
        rows += [{"attribute": attr["name"], "term": t, "stereotyped": s, "other": o, "gap": round(float(g), 4)}
                 for t, s, o, g in zip(items, stereo, other, gaps, strict=True)]
    return {"attributes": results, "pairs": rows}


def table(report: dict) -> str:
    """The per-attribute results as a Markdown table."""
    lines = ["| attribute | pairs | mean gap (nats) | 95% CI | prefers stereotype |", "| --- | ---: | ---: | --- | ---: |"]
    for a in report["attributes"]:
        lines.append(f"| {a['name']} | {a['pairs']} | {a['mean_gap']:+.3f} | [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}] "
                     f"| {a['stereotyped_share']:.0%} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = report["attributes"]
    plt.rcParams["font.sans-serif"] = ["Noto Sans CJK SC", "WenQuanYi Zen Hei", "DejaVu Sans"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(attrs) + 1.5))
    y = np.arange(len(attrs))
    means = np.array([a["mean_gap"] for a in attrs])
    errors = np.array([[a["mean_gap"] - a["ci_low"] for a in attrs], [a["ci_high"] - a["mean_gap"] for a in attrs]])
    excludes_zero = [a["ci_low"] > 0 or a["ci_high"] < 0 for a in attrs]
    ax.barh(y, means, xerr=errors, capsize=4, color=["tab:red" if e else "tab:gray" for e in excludes_zero])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{a['name']} ({a['stereotyped_share']:.0%})" for a in attrs])
    ax.set_xlabel("log-likelihood gap, stereotyped - other (nats); 95% bootstrap CI")
    ax.set_title("bias audit (red: CI excludes 0; in brackets: pairs preferring the stereotype)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
