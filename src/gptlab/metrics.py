"""What a run reports: metrics.csv (always), TensorBoard event files (when asked and installed),
and `gptlab plot` (loss, learning rate and throughput curves as loss.png)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError, require_package

LM_METRICS = ("val_loss", "val_ppl", "val_bpb")  # what evaluate_lm reports; fine-tuning tasks report others


def metric_fields(metric_names: tuple[str, ...] = LM_METRICS) -> list[str]:
    """The metrics.csv columns of a run whose evaluation reports `metric_names`."""
    return ["step", "tokens", "train_loss", *metric_names, "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"]


class MetricsError(GptlabError):
    """A run directory has no readable metrics."""


class MetricsLog:
    """metrics.csv in the run directory, one row per optimizer step, plus TensorBoard scalars if asked.

    A resumed run keeps the rows up to its checkpoint's step and drops the later ones (written by the
    interrupted run after its last checkpoint), so the file reads as if the run had never stopped."""

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = False,
                 metric_names: tuple[str, ...] = LM_METRICS) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.csv"
        self.fields = metric_fields(metric_names)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_metrics(self.path) if int(row["step"]) <= resume_step]
        tmp = self.path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self.tensorboard = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            # repr: floats round-trip exactly, so resumed and straight runs compare bit for bit
            csv.DictWriter(handle, self.fields).writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def require_tensorboard() -> None:
    require_package("tensorboard", "pip install 'gptlab[tensorboard]'", "--logger tensorboard")


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        if row.get(key):
            steps.append(int(row["step"]))
            values.append(float(row[key]))
    return steps, values


def plot(run_dir: str | Path) -> Path:
    """Draw train/val loss, learning rate and tokens/s against the step into run_dir/loss.png."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise MetricsError(f"no metrics.csv in {run_dir} (is it a training run directory?)")
    rows = read_metrics(path)
    if not rows:
        raise MetricsError(f"{path} has no rows yet")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(*_column(rows, "train_loss"), label="train", linewidth=1)
    val_steps, val_loss = _column(rows, "val_loss")
    ax_loss.plot(val_steps, val_loss, "o-", label="val")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.set_title(run_dir.name)
    ax_lr.plot(*_column(rows, "lr"))
    ax_lr.set_ylabel("learning rate")
    ax_speed.plot(*_column(rows, "tokens_per_s"))
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("step")
    for ax in (ax_loss, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    tmp = run_dir / ".loss.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def model_flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight (forward + backward) plus attention."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * block_size


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices (None without a peak)."""
    if not peak_flops or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / (peak_flops * devices)
