"""Prompts with images: `<image>` placeholders become slots for image embeddings.

The prompt text is split at each IMAGE_PLACEHOLDER, the pieces are tokenized on their own and every
placeholder becomes `image_tokens` slot positions (their token id is only a filler: `splice` replaces the
embeddings there with the image's). Training (gptlab.finetune), `LanguageModel.generate(..., images=)` and the
server all encode through `encode_prompt`, so a model sees at inference exactly the layout it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class MultimodalPrompt:
    ids: list[int]  # tokens, image slots filled with the tokenizer's <|endoftext|> id
    image_starts: list[int]  # the first slot position of each image, in placeholder order


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def encode_prompt(text: str, tokenizer: Tokenizer, image_tokens: int, images: int) -> MultimodalPrompt:
    """Token ids of `text` with `image_tokens` slots at each placeholder; the placeholders must match `images`."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != images:
        raise GptlabError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {images} "
                          f"image(s): put one {IMAGE_PLACEHOLDER} where each image goes")
    ids: list[int] = []
    starts: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            starts.append(len(ids))
            ids += [tokenizer.eot_id] * image_tokens
        ids += tokenizer.encode(piece) if piece else []
    return MultimodalPrompt(ids, starts)


def splice(token_embeds: torch.Tensor, image_embeds: torch.Tensor, rows: torch.Tensor,
           starts: torch.Tensor) -> torch.Tensor:
    """token_embeds (B, T, C) with image i's embeddings (N, C) written at rows[i], positions starts[i]..+N.

    Out of place, so gradients flow to both the token and the image embeddings."""
    n = image_embeds.size(1)
    positions = starts[:, None] + torch.arange(n, device=starts.device)  # (I, N)
    return token_embeds.index_put((rows[:, None].expand_as(positions), positions),
                                  image_embeds.to(token_embeds.dtype))
