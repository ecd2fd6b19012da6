"""`gptlab finetune`'s settings: what to adapt and how (FinetuneConfig), merged with the shared TrainConfig
from fine-tuning defaults, a YAML file and flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gptlab.config import ConfigError, TrainConfig, load_yaml

# imported where used: lora and vision load torch, prompts numpy, none of which `gptlab finetune --help` needs
if TYPE_CHECKING:
    from gptlab.lora import LoRAConfig
    from gptlab.tokenizer import Tokenizer
    from gptlab.vision import VisionConfig

# `gptlab finetune` defaults where they differ from pretraining's (a YAML file or flags override them)
TRAIN_DEFAULTS: dict[str, Any] = dict(out="runs/finetune", max_steps=500, batch_size=16, lr=1e-3, min_lr=0.0,
                                      warmup_steps=20, weight_decay=0.0, eval_interval=100, ckpt_interval=100)


@dataclass
class FinetuneConfig:
    """What to adapt and how (the optimisation settings are the shared TrainConfig)."""

    task: Literal["sft", "classify", "tag", "vqa"] = "sft"  # vqa: image + question -> answer (gptlab.vision)
    method: Literal["full", "lora", "freeze"] = "lora"
    train_layers: int = 1  # freeze: how many top blocks train (0: only the head)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj"  # comma-separated: attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj
    # lora: the distinct tokens of this text train as whole embedding rows (PEFT's trainable_token_indices), e.g.
    # "0123456789" for a base that has hardly read digits; a tied LM head gets the same rows
    lora_tokens: str = ""
    from_scratch: bool = False  # --init's architecture and tokenizer, freshly initialised weights (a baseline)
    lm_weight: float = 0.0  # classify: weight of the auxiliary next-token loss on the texts (GPT-1 uses 0.5)
    eval_items: int = 500  # validation items scored at each evaluation (0: all)
    max_new_tokens: int = 64  # generation length cap when scoring SFT
    prompt_style: str = "instruction"  # sft: how conversations are rendered (gptlab.prompts); kept in the checkpoint
    # tag: what each word's tag is read from. left: the word's first token (a causal model sees only the words
    # before it); echo: the first token of the word in a second copy of the sentence, which sees it all
    tag_context: Literal["left", "echo"] = "echo"
    # tag: first: the head reads the hidden state at the word's first token; span: at its first and last tokens
    # side by side, so it knows where the word ends (a causal model's first token cannot: for one token per
    # Chinese character, 中 of 中国 and of 中国共产党 look alike there) and has seen all of it at the last
    tag_read: Literal["first", "span"] = "first"
    # tag: linear: the tag is the head's reading of the word alone; bilstm: a one-layer bidirectional LSTM runs
    # over the sentence's words first, so each word's tag also sees the words after it without paying for echo's
    # second copy (the BiLSTM-CRF taggers' design, on the GPT's features instead of word embeddings)
    tag_head: Literal["linear", "bilstm"] = "linear"

    vision_encoder: str = "cnn"  # vqa: the image encoder trained with the model (gptlab.vision.encoder)
    vision_width: int = 64  # vqa: the encoder's feature width
    image_tokens: int = 16  # vqa: embeddings per image (a square number)
    # vqa: LLaVA's two stages. The first stage1_steps optimizer steps draw only the questions whose "type" is one
    # of stage1_types (comma-separated), so the vision tower learns what the image shows before the questions
    # that compare it with the prompt: trained on everything from the start, easy-VQA's shape features never
    # formed (the colour questions are easy, the yes/no ones are answered from the question alone)
    stage1_steps: int = 0
    stage1_types: str = "shape,color"
    # vqa: steps that train the vision tower alone before the question answering, a linear head per attribute of
    # the training records' image_labels (gptlab.vision.pretrain): through the GPT, a from-scratch encoder learnt
    # only the attribute it met first
    vision_pretrain_steps: int = 0
    # vqa: the vision encoder does not train with the GPT (the projector does), as LLaVA keeps its pretrained one:
    # the features --vision-pretrain-steps taught it stay as they are
    freeze_vision_encoder: bool = False

    def __post_init__(self) -> None:
        if self.task not in ("sft", "classify", "tag", "vqa"):
            raise ConfigError(f"task must be sft, classify, tag or vqa, got {self.task!r}")
        if self.tag_context not in ("left", "echo"):
            raise ConfigError(f"tag_context must be left or echo, got {self.tag_context!r}")
        if self.tag_read not in ("first", "span"):
            raise ConfigError(f"tag_read must be first or span, got {self.tag_read!r}")
        if self.tag_head not in ("linear", "bilstm"):
            raise ConfigError(f"tag_head must be linear or bilstm, got {self.tag_head!r}")
        if self.method not in ("full", "lora", "freeze"):
            raise ConfigError(f"method must be full, lora or freeze, got {self.method!r}")
        if self.lora_tokens and self.method != "lora":
            raise ConfigError(f"lora_tokens applies to method lora only (method {self.method} trains "
                              f"{'every' if self.method == 'full' else 'no'} embedding row)")
        for name in ("train_layers", "eval_items", "stage1_steps", "vision_pretrain_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if isinstance(self.lm_weight, bool) or not isinstance(self.lm_weight, (int, float)) \
                or not 0 <= self.lm_weight <= 100:
            raise ConfigError(f"lm_weight must be in [0, 100], got {self.lm_weight}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.stage1_steps and not self.stage1_kinds():
            raise ConfigError("stage1_types must name at least one question type when stage1_steps is set")
        for name in ("stage1_steps", "vision_pretrain_steps", "freeze_vision_encoder"):
            if getattr(self, name) and self.task != "vqa":
                raise ConfigError(f"{name} applies to task vqa only, got task {self.task}")
        from gptlab import prompts

        prompts.get(self.prompt_style)
        self.lora_config()  # validates the LoRA settings early
        self.vision_config()

    def stage1_kinds(self) -> set[str]:
        return {kind.strip() for kind in self.stage1_types.split(",") if kind.strip()}

    def vision_config(self) -> VisionConfig:
        from gptlab.vision import VisionConfig

        return VisionConfig(encoder=self.vision_encoder, width=self.vision_width, image_tokens=self.image_tokens)

    def lora_config(self, tokenizer: Tokenizer | None = None) -> LoRAConfig:
        """The LoRA settings; the embedding rows of `lora_tokens` need the model's tokenizer to be known."""
        from gptlab.lora import LoRAConfig

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        token_ids = tuple(tokenizer.encode(self.lora_tokens)) if tokenizer is not None else ()
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets,
                          token_ids=token_ids)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def configs_from_sources(yaml_path: str | None, train_flags: dict[str, Any], finetune_flags: dict[str, Any],
                         ) -> tuple[TrainConfig, FinetuneConfig]:
    """Fine-tuning defaults, then a YAML file (keys of either config), then flags (None = not given)."""
    finetune_keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    loaded = load_yaml(yaml_path) if yaml_path else {}
    train_values = {**TRAIN_DEFAULTS, **{k: v for k, v in loaded.items() if k not in finetune_keys},
                    **{k: v for k, v in train_flags.items() if v is not None}}
    finetune_values = {**{k: v for k, v in loaded.items() if k in finetune_keys},
                       **{k: v for k, v in finetune_flags.items() if v is not None}}
    try:
        return TrainConfig.from_sources(None, **train_values), FinetuneConfig(**finetune_values)
    except TypeError as err:
        raise ConfigError(str(err)) from None

