"""`LanguageModel`, what `gptlab.load(path)` returns: a model with its tokenizer, prompt style, optional
speculative decoding and vision tower, with `generate`, `stream` and `complete` built on the decoding engine
(gptlab.generate) and `beam_search` (gptlab.beam) for num_beams > 1."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gptlab import cpu, loading, prompts
from gptlab.beam import beam_search
from gptlab.config import ConfigError
from gptlab.device import select_device
from gptlab.errors import GptlabError
from gptlab.generate import Completion, Decoder, SequenceError, complete
from gptlab.model import GPT
from gptlab.prompts import PromptStyle
from gptlab.sampling import SamplingConfig
from gptlab.speculative import SpeculativeConfig, load_speculation
from gptlab.tokenizer import Tokenizer
from gptlab.vision import VisionTower, encode_prompt, load_image, splice

Image = bytes | str | Path | torch.Tensor  # encoded bytes, a file, or pixels (3, S, S) in [0, 1]

BEAM_FIELDS = ("max_new_tokens", "stop_token_ids", "ignore_eos")  # the SamplingConfig fields beam search uses


def check_beam_settings(cfg: SamplingConfig, slide: bool = False) -> None:
    """Refuse what beam search would ignore (the sampling controls, stop strings, a seed, a sliding context)
    rather than drop it silently; temperature 0 (greedy) is allowed: deterministic, like beam search."""
    ignored = [name for name in cfg.changed() if name not in BEAM_FIELDS and not (name == "temperature" and cfg.greedy)]
    ignored += ["slide_context"] * slide
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ConfigError(f"beam search picks the most likely tokens and does not use {flags}: drop "
                          f"{'it' if len(ignored) == 1 else 'them'}, or sample with --num-beams 1")


class LanguageModel:
    """A model with its tokenizer, ready to generate: what `gptlab.load(path)` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | str = "cpu",
                 max_batch: int = 8, prompt_style: PromptStyle | None = None,
                 speculation: SpeculativeConfig | None = None, vision: VisionTower | None = None) -> None:
        # on CPU: the layouts of the fastest matmul kernels, the fused decode step (gptlab.cpu)
        self.model = cpu.prepare_inference(model.to(device).eval())
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.prompt_style = prompt_style or prompts.get(prompts.DEFAULT_STYLE)  # how chat messages are rendered
        self.speculation = speculation  # every Decoder of this model speculates so (gptlab.speculative)
        if speculation is not None and speculation.draft is not None:
            cpu.prepare_inference(speculation.draft.to(device).eval())
        # image encoder + projector of a multimodal run (gptlab finetune --task vqa); None: text only
        self.vision = vision.to(device).eval() if vision is not None else None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", quantize: str | None = None,
             draft: str | Path | None = None, num_draft_tokens: int = 4, prompt_lookup: bool = False,
             ) -> LanguageModel:
        """Any model `gptlab.loading` reads, ready to generate; quantize="int8" for int8 weights (CPU) (the
        draft's too). Speculative decoding: `draft` (a path: a small model with the same tokenizer) or
        `prompt_lookup=True`, guessing `num_draft_tokens` tokens per pass of the model."""
        if quantize not in (None, "int8"):
            raise ConfigError(f"quantize must be None or 'int8', got {quantize!r}")
        if draft is not None and prompt_lookup:
            raise ConfigError("speculative decoding takes either a draft model or prompt lookup, not both")
        if draft is not None or prompt_lookup:
            SpeculativeConfig(prompt_lookup=True, num_draft_tokens=num_draft_tokens)  # a bad k fails first
        return cls.from_loaded(loading.load(path), device, quantize, draft, num_draft_tokens, prompt_lookup)

    @classmethod
    def from_loaded(cls, loaded: loading.Loaded, device: str = "cpu", quantize: str | None = None,
                    draft: str | Path | None = None, num_draft_tokens: int = 4, prompt_lookup: bool = False,
                    ) -> LanguageModel:
        """A model `gptlab.loading.load` already read (a language model, not a classifier or tagger); the
        other arguments as in `load`."""
        if quantize not in (None, "int8"):
            raise ConfigError(f"quantize must be None or 'int8', got {quantize!r}")
        device = select_device(device)
        if quantize == "int8" and device.type != "cpu":
            raise ConfigError("--quantize int8 runs on CPU only")
        speculation = None
        model = loaded.gpt()
        if draft is not None or prompt_lookup:
            speculation = load_speculation(loaded.tokenizer, draft, num_draft_tokens)
        if quantize == "int8":
            for m in (model, speculation and speculation.draft):
                if m is not None:
                    cpu.prepare_inference(m, quantize="int8")
        return cls(model, loaded.tokenizer, device, prompt_style=loaded.prompt_style, speculation=speculation,
                   vision=loaded.vision)

    def _encode(self, prompts: str | Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise GptlabError("no prompts given")
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not all(encoded):
            raise GptlabError("a prompt is empty (it encodes to no tokens)")
        return encoded

    def load_images(self, images: Sequence[Image]) -> torch.Tensor:
        """Pixels (n, 3, S, S) of the images, checked (gptlab.vision.images) and resized for this model."""
        if self.vision is None:
            raise GptlabError("this model takes no images: it has no vision encoder (train one with "
                              "`gptlab finetune --task vqa`)")
        size = self.vision.config.image_size
        return torch.stack([image if isinstance(image, torch.Tensor) else load_image(image, size) for image in images])

    @torch.inference_mode()
    def image_prompt(self, prompt: str, images: Sequence[Image] | torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Token ids of a prompt with one `<image>` placeholder per image, and its input embeddings: the
        tokens' with each image's embeddings at its placeholder (what `Decoder.add` takes as embeds)."""
        pixels = images if isinstance(images, torch.Tensor) else self.load_images(images)
        encoded = encode_prompt(prompt, self.tokenizer, self.vision.config.image_tokens, len(pixels))
        if not encoded.ids:
            raise GptlabError("the prompt is empty")
        ids = torch.tensor(encoded.ids, device=self.device)
        starts = torch.tensor(encoded.image_starts, device=self.device, dtype=torch.long)
        embeds = splice(self.model.transformer.wte(ids)[None], self.vision(pixels.to(self.device)),
                        torch.zeros_like(starts), starts)
        return encoded.ids, embeds[0]

    def _prepare(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 images: Sequence[Image] | Sequence[Sequence[Image]] | None,
                 ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Token prompts and, with images (a list for one prompt, a list per prompt for several), embeddings."""
        if images is None:
            return self._encode(prompts), None
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = [images] if isinstance(prompts, str) else list(images)
        if len(per_prompt) != len(texts) or not all(isinstance(t, str) for t in texts):
            raise GptlabError("images: give one list of images per text prompt")
        prepared = [self.image_prompt(text, imgs) for text, imgs in zip(texts, per_prompt, strict=True)]
        return [ids for ids, _ in prepared], [embeds for _, embeds in prepared]

    def complete(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 cfg: SamplingConfig | None = None, images: Sequence[Image] | Sequence[Sequence[Image]] | None = None,
                 slide: bool = False) -> list[Completion]:
        """Generate for every prompt (text or token ids), up to `max_batch` at a time; `images` as in generate.
        Prompt i samples with `cfg.for_sequence(i)` (seed + i); `slide`: generation may run past the context
        (see gptlab.generate.Decoder)."""
        encoded, embeds = self._prepare(prompts, images)
        cfg = cfg or SamplingConfig()
        configs = [cfg.for_sequence(i) for i in range(len(encoded))]
        return complete(self.model, self.tokenizer, encoded, configs, self.max_batch, self.speculation, embeds, slide)

    def generate(self, prompts: str | Sequence[str], num_beams: int = 1, length_penalty: float = 1.0,
                 images: Sequence[Image] | Sequence[Sequence[Image]] | None = None, slide: bool = False,
                 **sampling) -> list[str]:
        """Continuations of each prompt (the prompt itself is not repeated).

        images: for a multimodal model, the images of a prompt with one `<image>` placeholder per image
        (a list per prompt when several prompts are given); they are embedded where their placeholders are.
        slide: let generation run past the context, dropping its oldest tokens (see gptlab.generate.Decoder).

        `sampling` takes the fields of SamplingConfig (with a seed, prompt i samples with seed + i);
        num_beams > 1 runs beam search instead, which uses max_new_tokens, stop_token_ids and ignore_eos
        only: any other sampling setting is refused (ConfigError).
        """
        cfg = SamplingConfig(**sampling)
        if num_beams > 1 and images is not None:
            raise ConfigError("beam search takes no images: use num_beams=1")
        if num_beams > 1:
            check_beam_settings(cfg, slide)
            eos = [*cfg.stop_token_ids, *([] if cfg.ignore_eos else [self.tokenizer.eot_id])]
            outputs = []
            for ids in self._encode(prompts):
                tokens = beam_search(self.model, ids, num_beams, cfg.max_new_tokens, length_penalty, eos)
                outputs.append(self.tokenizer.decode(t for t in tokens if t not in eos))
            return outputs
        if num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
        return [c.text for c in self.complete(prompts, cfg, images, slide)]

    def stream(self, prompt: str | Sequence[int], images: Sequence[Image] | None = None, slide: bool = False,
               **sampling) -> Iterator[str]:
        """Yield text pieces as tokens arrive (never half a UTF-8 character, never a stop string); `images` and
        `slide` as in generate."""
        cfg = SamplingConfig(**sampling)
        (ids,), embeds = self._prepare([prompt], None if images is None else [images])
        decoder = Decoder(self.model, self.tokenizer, 1, self.device,
                          min(len(ids) + cfg.max_new_tokens, self.model.config.block_size), self.speculation, slide)
        decoder.add(ids, cfg, None if embeds is None else embeds[0])
        while True:
            for _, event in decoder.step_many():
                if event.finish_reason == "error":
                    raise SequenceError("generation failed: the next-token distribution is not finite")
                if event.text:
                    yield event.text
                if event.finish_reason is not None:
                    return
