"""`gptlab inspect`'s output: one self-contained HTML page (inline JS/CSS, no network), PNGs and report.json."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from gptlab.interpret.inspection import Inspection, to_json
from gptlab.outputs import atomic_directory

PNGS = ("tokens.png", "attention.png", "logit_lens.png", "attribution.png", "induction.png", "patching.png")


def write_report(inspection: Inspection, out: str | Path, source: str = "") -> dict:
    """Write OUT/report.html, OUT/report.json and the PNGs (patching.png only with a corrupted prompt);
    OUT must not exist yet (or be empty), and appears only once everything is written."""
    data = {"source": source, **to_json(inspection)}
    with atomic_directory(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(data))
        template = (resources.files("gptlab") / "static" / "inspect.html").read_text(encoding="utf-8")
        # inside <script>, "</" could end the element early: JSON allows the escaped form
        (tmp / "report.html").write_text(template.replace("/*DATA*/null", json.dumps(data).replace("</", "<\\/")),
                                         encoding="utf-8")
        written = _plots(inspection, tmp)
    return {"out": str(out), "files": ["report.html", "report.json", *written]}


def _label(token: str) -> str:
    return repr(token)[1:-1] or "∅"


def _plots(ins: Inspection, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(t) for t in ins.tokens]
    prompt_labels = labels[: ins.n_prompt]
    n_layer, n_head = ins.attention.shape[:2]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    width = max(6, 0.45 * len(labels))
    fig, axes = plt.subplots(2, 1, figsize=(width, 4.5), sharex=True)
    axes[0].bar(range(len(labels)), ins.surprisal.nan_to_num(0).tolist(), color="tab:red")
    axes[0].set_ylabel("surprisal (bits)")
    axes[1].bar(range(len(labels)), ins.entropy.tolist(), color="tab:blue")
    axes[1].set_ylabel("next-token entropy (bits)")
    axes[1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    save(fig, "tokens.png")

    fig, axes = plt.subplots(n_layer, n_head, figsize=(2.2 * n_head, 2.2 * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(ins.attention[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    save(fig, "attention.png")

    fig, ax = plt.subplots(figsize=(width, 0.5 * (n_layer + 1) + 1.5))
    ax.imshow(ins.lens_probs[:, :, 0].numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for layer, row in enumerate(ins.lens_tokens):
        for pos, top in enumerate(row):
            ax.text(pos, layer, _label(top[0])[:6], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(n_layer + 1), ["embed", *[f"layer {i}" for i in range(n_layer)]])
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_title("logit lens: top next token read from each layer (shade: its probability)")
    save(fig, "logit_lens.png")

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * ins.n_prompt), 3))
    values = ins.attribution.tolist()
    ax.bar(range(ins.n_prompt), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set_xticks(range(ins.n_prompt), prompt_labels, rotation=90, fontsize=8)
    target = "".join(ins.tokens[ins.n_prompt:])
    ax.set_title(f"integrated gradients of log p({target!r}) per prompt token", fontsize=9)
    save(fig, "attribution.png")

    fig, ax = plt.subplots(figsize=(max(3, 0.6 * n_head + 1.5), max(2.5, 0.5 * n_layer + 1)))
    image = ax.imshow(ins.induction.numpy(), cmap="magma", vmin=0, vmax=1)
    for layer in range(n_layer):
        for head in range(n_head):
            ax.text(head, layer, f"{ins.induction[layer, head]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if ins.induction[layer, head] < 0.5 else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("induction score")
    fig.colorbar(image)
    save(fig, "induction.png")

    if ins.patching is not None:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * ins.n_prompt), 0.5 * n_layer + 2))
        effect = (ins.patching - ins.corrupt_logprob).numpy()
        bound = max(abs(effect).max(), 1e-6)
        image = ax.imshow(effect, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xticks(range(ins.n_prompt), prompt_labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n_layer), [f"layer {i}" for i in range(n_layer)])
        ax.set_title("activation patching: log-prob restored vs the corrupted prompt (nats)", fontsize=9)
        fig.colorbar(image)
        save(fig, "patching.png")
    return written
