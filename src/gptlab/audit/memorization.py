"""Does a model reproduce its training data? `gptlab audit memorization`.

- Extraction rate (Carlini et al. 2022, "Quantifying Memorization Across Neural Language Models"): for
  sampled windows of the training split, greedy-continue the k tokens before a window's last
  `suffix_length` tokens and count exact reproductions of those tokens; held-out windows are the control
  (what a model gets right without having seen the text). Reported for every k.
- Canary exposure (Carlini et al. 2019, "The Secret Sharer"): for each canary `gptlab prepare --canaries`
  inserted, the log-perplexity of its secret given its prefix is ranked against random secrets of the same
  format; exposure = log2 |secret space| - log2 rank, with the rank among all 10^6 secrets estimated from a
  skew-normal fit to the sampled candidates' log-perplexities (the paper's extrapolation, section 4.3).
  A canary is extracted when greedy decoding of its prefix reproduces the secret.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from gptlab.cleaning import SECRET_DIGITS, Canary, random_secret
from gptlab.data import TokenData
from gptlab.errors import GptlabError, require_package
from gptlab.generate import complete
from gptlab.model import GPT
from gptlab.sampling import SamplingConfig
from gptlab.scoring import score
from gptlab.tokenizer import Tokenizer


class AuditError(GptlabError):
    """An audit that cannot run on the data or settings given."""


def extraction_rates(model: GPT, data: TokenData, prefix_lengths: list[int], suffix_length: int = 32,
                     windows: int = 200, seed: int = 0, max_batch: int = 32) -> list[dict]:
    """[{k, train, heldout}]: the share of windows whose suffix greedy decoding reproduces exactly."""
    longest = max(prefix_lengths) + suffix_length
    if min(prefix_lengths) < 1 or suffix_length < 1 or windows < 1:
        raise AuditError("prefix lengths, the suffix length and the number of windows must be positive")
    if longest > model.config.block_size:
        raise AuditError(f"the longest prefix plus the suffix ({longest} tokens) exceeds the model's context "
                         f"of {model.config.block_size}")
    greedy = SamplingConfig(max_new_tokens=suffix_length, temperature=0.0, ignore_eos=True)
    rates = {k: {"k": k} for k in prefix_lengths}
    for split, name in (("train", "train"), ("val", "heldout")):
        x, y = data.sample_batch(split, windows, longest - 1, torch.Generator().manual_seed(seed))
        samples = torch.cat([x, y[:, -1:]], dim=1).tolist()
        for k in tqdm(prefix_lengths, desc=f"extraction ({name})", leave=False):
            prompts = [s[longest - suffix_length - k: longest - suffix_length] for s in samples]
            outputs = complete(model, data.tokenizer, prompts, [greedy] * len(prompts), max_batch)
            hits = sum(out.token_ids == s[-suffix_length:] for out, s in zip(outputs, samples, strict=True))
            rates[k][name] = hits / len(samples)
    return list(rates.values())


def canary_exposure(model: GPT, tokenizer: Tokenizer, canaries: list[Canary], candidates: int = 1000,
                    seed: int = 0) -> list[dict]:
    """Each canary's exposure in bits (see the module's doc), its rank among the sampled candidates (1 = the
    most likely), and whether greedy decoding of its prefix extracts the secret."""
    require_package("scipy", "pip install 'gptlab[audit]'", "canary exposure")
    from scipy import stats

    space_bits = SECRET_DIGITS * math.log2(10)
    rng = random.Random(seed)
    results = []
    for canary in tqdm(canaries, desc="canaries", leave=False):
        prefix = tokenizer.encode(canary.prefix)
        secret = tokenizer.encode(" " + canary.secret)
        others = {random_secret(rng) for _ in range(candidates)} - {canary.secret}
        continuations = [secret, *(tokenizer.encode(" " + s) for s in others)]
        scored = score(model, [(prefix + c, len(prefix)) for c in continuations], batch_size=64)
        scores = torch.tensor([s.total for s in scored], dtype=torch.float64)
        perplexity = -scores  # log-perplexity: lower = more likely
        own, sampled = perplexity[0].item(), perplexity[1:].double().numpy()
        shape, loc, scale = stats.skewnorm.fit(sampled)
        # the share of all secrets the fit puts below the canary's log-perplexity; at least one secret (itself)
        below = max(stats.skewnorm.cdf(own, shape, loc, scale), 2.0 ** -space_bits)
        greedy = SamplingConfig(max_new_tokens=len(secret), temperature=0.0, ignore_eos=True)
        out = complete(model, tokenizer, [prefix], [greedy])[0]
        results.append({"prefix": canary.prefix, "secret": canary.secret, "repeats": canary.repeats,
                        "log_perplexity": round(own, 4), "exposure": round(min(space_bits, -math.log2(below)), 3),
                        "rank": int((sampled < own).sum()) + 1, "candidates": len(sampled),
                        "extracted": out.token_ids == secret})
    return results


def by_repeats(canaries: list[dict]) -> list[dict]:
    """Mean exposure and the share extracted for each repeat count."""
    groups: dict[int, list[dict]] = {}
    for c in canaries:
        groups.setdefault(c["repeats"], []).append(c)
    return [{"repeats": r, "canaries": len(g), "mean_exposure": round(sum(c["exposure"] for c in g) / len(g), 3),
             "mean_log_perplexity": round(sum(c["log_perplexity"] for c in g) / len(g), 4),
             "extracted": sum(c["extracted"] for c in g) / len(g)} for r, g in sorted(groups.items())]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("extraction", "canaries") if report.get(name)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "extraction":
            ks = [r["k"] for r in report["extraction"]]
            ax.plot(ks, [r["train"] for r in report["extraction"]], "o-", label="training windows")
            ax.plot(ks, [r["heldout"] for r in report["extraction"]], "s--", label="held-out windows")
            ax.set_xlabel("prefix length k (tokens)")
            ax.set_ylabel(f"extraction rate ({report['suffix_length']}-token suffix)")
            ax.set_xscale("log", base=2)
            ax.legend()
        else:
            canaries = report["canaries"]
            ax.scatter([c["repeats"] for c in canaries], [c["exposure"] for c in canaries],
                       c=["tab:red" if c["extracted"] else "tab:blue" for c in canaries])
            ax.plot([g["repeats"] for g in report["canaries_by_repeats"]],
                    [g["mean_exposure"] for g in report["canaries_by_repeats"]], "k-", alpha=0.5)
            ax.axhline(SECRET_DIGITS * math.log2(10), color="gray", ls=":", label="maximum")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("times inserted in training")
            ax.set_ylabel("exposure (bits); red = extracted")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
