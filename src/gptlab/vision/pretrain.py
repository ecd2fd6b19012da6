"""The vision tower trained alone on what each image shows, before it is put in front of the language model.

LLaVA starts from a vision encoder that already sees (CLIP); one trained from scratch here has to learn that from
the question answering itself, and on easy-VQA it did not: trained through the GPT on colour and shape questions
together, the encoder only ever learnt the attribute that came first (colour, even when shape questions were eight
times as many; shape, when they came alone first), the other stayed at chance. Trained directly, with a linear
head per attribute on the tower's output, the same tower learns both in a few hundred steps, and the GPT then
learns to read them. `gptlab finetune --task vqa --vision-pretrain-steps N` runs this on the training records'
`image_labels` ({"color": "blue", "shape": "circle"}) before the question answering; the heads are thrown away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gptlab.vision.encoder import VisionTower

UNLABELLED = -100  # cross_entropy's ignore_index: an image whose records do not say this attribute


def label_table(labels: list[dict[str, str]], classes: dict[str, list[str]] | None = None,
                ) -> tuple[dict[str, list[str]], torch.Tensor]:
    """The attributes' classes (sorted values, from `labels` unless given) and a (images, attributes) table of
    class indices, UNLABELLED where an image has no (known) value."""
    if classes is None:
        classes = {key: sorted({row[key] for row in labels if key in row}) for key in sorted({k for r in labels
                                                                                               for k in r})}
    index = {key: {value: i for i, value in enumerate(values)} for key, values in classes.items()}
    table = torch.tensor([[index[key].get(row.get(key), UNLABELLED) for key in classes] for row in labels],
                         dtype=torch.long).reshape(len(labels), len(classes))
    return classes, table


def pretrain_tower(tower: VisionTower, pixels: torch.Tensor, labels: list[dict[str, str]], steps: int,
                   batch_size: int, lr: float, seed: int, val: tuple[torch.Tensor, list[dict[str, str]]] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, float]:
    """Train all of `tower` in place for `steps` AdamW steps (its parameters' requires_grad are left as they
    were) on random batches of the labelled images of `pixels` ((images, 3, S, S) uint8), one linear head per
    attribute of `labels` (one dict per image) reading the tower's flattened output, the attributes'
    cross-entropies summed. Returns the heads' accuracy per attribute on `val` (pixels, labels),
    `vision_<attribute>`."""
    classes, table = label_table(labels)
    if not classes:
        raise ValueError("no image has a label to pretrain the vision tower on")
    device = next(tower.parameters()).device
    width = tower.config.image_tokens * tower.projector[-1].out_features
    heads = nn.ModuleList(nn.Linear(width, len(values)) for values in classes.values()).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    labelled = (table != UNLABELLED).any(1).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    was_training, frozen = tower.training, [p for p in tower.parameters() if not p.requires_grad]
    tower.train()
    tower.requires_grad_(True)  # all of it, an encoder that stays frozen afterwards too
    for _ in tqdm(range(steps), desc="vision tower", unit="step", leave=False):
        rows = labelled[torch.randint(len(labelled), (batch_size,), generator=generator)]
        features = tower(pixels[rows].to(device).float() / 255).flatten(1)
        targets = table[rows].to(device)
        # an attribute no image of the batch has adds nothing (cross_entropy of all-ignored targets is nan)
        loss = sum(F.cross_entropy(head(features), targets[:, i]) for i, head in enumerate(heads)
                   if (targets[:, i] != UNLABELLED).any())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scores = {}
    if val is not None:
        tower.eval()
        _, val_table = label_table(val[1], classes)
        with torch.no_grad():
            features = torch.cat([tower(chunk.to(device).float() / 255).flatten(1) for chunk in val[0].split(256)])
        for i, (key, head) in enumerate(zip(classes, heads, strict=True)):
            known = val_table[:, i] != UNLABELLED
            hits = head(features[known]).argmax(1).cpu() == val_table[known, i]
            scores[f"vision_{key}"] = hits.float().mean().item() if len(hits) else float("nan")
        log(f"vision tower pretrained for {steps} steps; its heads are right on the validation images' "
            + ", ".join(f"{key.removeprefix('vision_')} {100 * value:.1f}%" for key, value in scores.items()))
    tower.train(was_training)
    for p in frozen:
        p.requires_grad_(False)
    return scores
