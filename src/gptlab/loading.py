"""Loading a model: the one `load(path)` behind every command and `gptlab.load`.

A path is one of
  a Hugging Face GPT-2 directory (config.json + weights, no gptlab checkpoint)   read by gptlab.hf
  a run directory or checkpoint file                                    the GPT it holds
  a `gptlab finetune` run or checkpoint (payload["finetune"])           rebuilt on its base model: LoRA and
                                                                        freeze runs store only what trained
and comes back with its tokenizer and the prompt style it was fine-tuned with (gptlab.prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab import checkpoint, hf, lora, prompts
from gptlab.checkpoint import CheckpointError
from gptlab.config import GPTConfig
from gptlab.finetune.config import FinetuneConfig
from gptlab.finetune.model import FinetuneModel, fingerprint, prepare_model
from gptlab.model import GPT
from gptlab.prompts import PromptStyle
from gptlab.tokenizer import Tokenizer
from gptlab.vision import VisionTower


@dataclass
class Loaded:
    model: FinetuneModel  # the GPT, with the LoRA layers or classification head of a fine-tuning run
    tokenizer: Tokenizer
    prompt_style: PromptStyle
    finetune: dict[str, Any] | None = None  # a fine-tuning run's record: {"config", "base", "labels"}

    @property
    def task(self) -> str:
        """The task: `classify` for a classifier, `tag` for a tagger, `sft` for every language model."""
        return self.finetune["config"]["task"] if self.finetune else "sft"

    @property
    def vision(self) -> VisionTower | None:
        """The image encoder + projector of a multimodal (`--task vqa`) run, None for a text-only model."""
        return self.model.vision

    def gpt(self) -> GPT:
        """The plain language model with any LoRA update merged in: what generation, serving, conversion and
        `--init` work on."""
        if self.task in ("classify", "tag"):
            raise CheckpointError(f"this is a {'tagger' if self.task == 'tag' else 'classifier'} checkpoint: "
                                  "apply it with `gptlab predict`, score it with `gptlab eval-task`")
        if lora.lora_layers(self.model.gpt):
            lora.merge_lora(self.model.gpt)
        return self.model.gpt.requires_grad_(True)


def load(path: str | Path) -> Loaded:
    if hf.is_hf_dir(path):
        gpt, tokenizer = hf.load_hf(path)
        return Loaded(FinetuneModel(gpt), tokenizer, prompts.get(prompts.DEFAULT_STYLE))
    return from_payload(checkpoint.load(path))


REQUIRED = ("model", "model_config", "tokenizer")  # what every gptlab checkpoint holds


def from_payload(payload: dict[str, Any]) -> Loaded:
    """A checkpoint already read with checkpoint.load; a forged or damaged one is a CheckpointError."""
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"not a complete gptlab checkpoint: it lacks {', '.join(missing)}")
    wrong = [key for key in ("model_config", "tokenizer") if not isinstance(payload[key], dict)]
    if wrong:
        raise CheckpointError(f"malformed gptlab checkpoint: its {', '.join(wrong)} is not a mapping")
    try:
        tokenizer, style = Tokenizer.from_dict(payload["tokenizer"]), prompts.style_of(payload)
        config = GPTConfig.from_dict(payload["model_config"])
    except (KeyError, TypeError, AttributeError) as err:  # a hand-made payload of the wrong shape
        raise CheckpointError(f"malformed gptlab checkpoint: its tokenizer or model_config is unreadable "
                              f"({type(err).__name__}: {err})") from None
    info = payload.get("finetune")
    if info is None:
        model = FinetuneModel(GPT(config))
        checkpoint.load_weights(model.gpt, payload["model"])
        return Loaded(model, tokenizer, style)
    base = info["base"]
    if base is None:  # --from-scratch runs and merged classifiers hold every weight
        gpt = GPT(config)
    else:
        gpt = load(base["path"]).gpt()
        if gpt.config != config or not math.isclose(fingerprint(gpt), base["fingerprint"], rel_tol=1e-9):
            raise CheckpointError(f"the base model {base['path']} changed since this adapter was trained on it")
    model = prepare_model(gpt, FinetuneConfig(**info["config"]), info["labels"], partial_state=base is not None,
                          tokenizer=tokenizer)
    checkpoint.load_weights(model, payload["model"])
    return Loaded(model, tokenizer, style, info)
