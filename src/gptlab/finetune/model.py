"""The model being fine-tuned: a GPT (possibly with LoRA layers) plus an optional classification or tagging
head (a linear layer on the last real token's hidden state, or on every word's, possibly after a BiLSTM over
the words) or vision tower (image encoder + projector), and which of its parameters train under each method."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gptlab import lora
from gptlab.config import ConfigError
from gptlab.finetune.config import FinetuneConfig
from gptlab.model import GPT, IGNORE_INDEX, linear_cross_entropy
from gptlab.tokenizer import Tokenizer
from gptlab.vision import VisionConfig, VisionTower, splice


class FinetuneModel(nn.Module):
    """A GPT (possibly with LoRA layers) plus an optional classification head.

    With `partial_state`, state_dict() holds only the parameters that train: the base weights come from
    the base checkpoint, so adapter checkpoints stay small and load_state_dict expects just those keys.
    """

    def __init__(self, gpt: GPT, num_labels: int = 0, partial_state: bool = False,
                 vision: VisionConfig | None = None, tag_reads: int = 1, tag_lstm: bool = False) -> None:
        super().__init__()
        self.gpt = gpt
        self.vision = VisionTower(vision, gpt.config.n_embd) if vision is not None else None
        self.config = gpt.config
        self.partial_state = partial_state
        self.tag_reads = tag_reads  # tagging: hidden states per word side by side (1: first token, 2: first and last)
        width = tag_reads * gpt.config.n_embd
        # tagging (tag_head "bilstm"): the words' readings pass through a bidirectional LSTM before the head
        self.tag_lstm = nn.LSTM(width, gpt.config.n_embd, batch_first=True, bidirectional=True) if tag_lstm else None
        if tag_lstm:
            width = 2 * gpt.config.n_embd
        self.head = nn.Linear(width, num_labels) if num_labels else None
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)  # GPT's initialisation: small logits at the start
            nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GPT's (logits, loss); images = (pixels (I, 3, S, S), row (I,), first slot position (I,)) of
        each image in the batch, embedded there by the vision tower."""
        return self.gpt(idx, targets, embeds=None if images is None else self.embed(idx, *images))

    def embed(self, idx: torch.Tensor, pixels: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, C) of idx with the images' embeddings at their slots (LLaVA's splice)."""
        return splice(self.gpt.transformer.wte(idx), self.vision(pixels), rows, starts)

    def classify(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Label logits (B, labels) from the hidden state of each row's last real token."""
        return self.classify_and_lm_loss(idx, last, with_lm_loss=False)[0]

    def tag(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, words, labels) from the hidden states at each word's first token, and its last too
        when the head reads two (positions: (B, words, 2) of each word's first and last tokens; padded words
        point at 0), through the BiLSTM over each sentence's words when there is one."""
        hidden = self.gpt.hidden_states(idx)
        read = positions[..., : self.tag_reads].flatten(1)  # (B, words * reads)
        states = hidden.gather(1, read[..., None].expand(-1, -1, hidden.size(-1))).view(*positions.shape[:2], -1)
        if self.tag_lstm is not None:
            # only a sentence's first word can start at 0, so the words after it with a later start are its own
            lengths = (positions[:, 1:, 0] > 0).sum(1) + 1
            packed = pack_padded_sequence(states, lengths.cpu(), batch_first=True, enforce_sorted=False)
            states = pad_packed_sequence(self.tag_lstm(packed)[0], batch_first=True, total_length=states.size(1))[0]
        return self.head(states)

    def classify_and_lm_loss(self, idx: torch.Tensor, last: torch.Tensor, with_lm_loss: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Label logits and, from the same forward pass, the next-token loss on each row's real tokens
        (GPT-1's auxiliary objective: the text's own language modelling keeps the features general)."""
        hidden = self.gpt.hidden_states(idx)
        logits = self.head(hidden[torch.arange(idx.size(0), device=idx.device), last])
        if not with_lm_loss:
            return logits, None
        # position j predicts token j + 1, which is real only while j < last (padding follows it)
        positions = torch.arange(idx.size(1) - 1, device=idx.device)
        targets = idx[:, 1:].masked_fill(positions >= last[:, None], IGNORE_INDEX)
        return logits, linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.gpt.lm_head.weight, targets.flatten())

    def trainable_names(self, prefix: str = "") -> set[str]:
        return {prefix + name for name, p in self.named_parameters() if p.requires_grad}

    def saved_names(self, prefix: str = "") -> set[str]:
        """What a partial state holds: the parameters that train, and the whole vision tower (a frozen encoder
        too: it is in no base checkpoint)."""
        vision = {f"{prefix}vision.{name}" for name, _ in self.vision.named_parameters()} if self.vision else set()
        return self.trainable_names(prefix) | vision

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        if self.partial_state:
            keep = self.saved_names(prefix)
            state = type(state)((k, v) for k, v in state.items() if k in keep)
        if destination is None:
            return state
        destination.update(state)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.partial_state:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        expected = self.saved_names()
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n"
                               f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def prepare_model(gpt: GPT, cfg: FinetuneConfig, labels: list[str] | None, partial_state: bool,
                  tokenizer: Tokenizer | None = None) -> FinetuneModel:
    """Wrap `gpt` for the task and set what trains according to the method (a vision tower always trains:
    `--method freeze --train-layers 0` is the frozen-LM recipe, LLaVA's first stage). `tokenizer`, the model's,
    turns `lora_tokens` into embedding rows."""
    model = FinetuneModel(gpt, len(labels) if cfg.task in ("classify", "tag") else 0, partial_state,
                          cfg.vision_config() if cfg.task == "vqa" else None,
                          tag_reads=2 if cfg.task == "tag" and cfg.tag_read == "span" else 1,
                          tag_lstm=cfg.task == "tag" and cfg.tag_head == "bilstm")
    if cfg.method == "lora":
        if cfg.lora_tokens and tokenizer is None:
            raise ValueError("lora_tokens names tokens: prepare_model needs the model's tokenizer")
        lora.apply_lora(gpt, cfg.lora_config(tokenizer))
    elif cfg.method == "freeze":
        blocks = gpt.transformer.h
        if cfg.train_layers > len(blocks):
            raise ConfigError(f"train_layers is {cfg.train_layers} but the model has {len(blocks)} blocks")
        gpt.requires_grad_(False)
        for block in blocks[len(blocks) - cfg.train_layers:]:
            block.requires_grad_(True)
        gpt.transformer.ln_f.requires_grad_(True)
    if model.head is not None:
        model.head.requires_grad_(True)
    if model.tag_lstm is not None:
        model.tag_lstm.requires_grad_(True)
    if model.vision is not None:
        model.vision.requires_grad_(True)
        model.vision.encoder.requires_grad_(not cfg.freeze_vision_encoder)
    return model


def fingerprint(model: nn.Module) -> float:
    """A cheap checksum of the weights: tells whether a base checkpoint changed since an adapter was trained."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))
