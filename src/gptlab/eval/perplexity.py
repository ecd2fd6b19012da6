"""`gptlab eval perplexity`: sliding-window perplexity and bits per byte of any text.

Each input is scored on its own: a text file as <|endoftext|> followed by its tokens (so its first token is
scored too, as after a document boundary in pretraining), a prepared dataset (`gptlab prepare`'s token
files) as the token stream of one split. Windows of up to the model's context start every `stride` tokens;
each window scores only the tokens no earlier window scored, so every token is scored exactly once, with at
least context - stride tokens before it once the first window is past (the Hugging Face perplexity guide's
sliding window). With stride = context the windows are the ones `gptlab train` evaluates on its validation
split: the same figure, but for the last partial window, which train leaves out and this scores.

bits per byte = total nats / ln 2 / UTF-8 bytes of the text scored: comparable across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.data import DataError, TokenData, list_text_files
from gptlab.language_model import LanguageModel
from gptlab.scoring import score
from gptlab.tokenizer import Tokenizer


@dataclass
class Document:
    name: str
    ids: list[int]  # the token stream; ids[0] is context only, every later token is scored
    bytes: int  # UTF-8 bytes of the scored text


@dataclass
class Score:
    name: str
    tokens: int
    bytes: int
    nll_sum: float  # nats

    @property
    def row(self) -> dict[str, float | int | str]:
        nll = self.nll_sum / self.tokens
        return {"input": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": nll,
                "perplexity": math.exp(min(nll, 700.0)), "bits_per_byte": self.nll_sum / math.log(2) / self.bytes}


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first): score stream[begin + first: end + 1] with stream[begin: end] as input, for a
    stream of n_tokens (its first token is context only). Every later token is scored once."""
    if not 0 < stride <= context:
        raise DataError(f"--stride must be in [1, {context}] (the model's context), got {stride}")
    scored, begin = 0, 0  # scored: the last position scored so far
    while scored < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        yield begin, end, scored + 1 - begin
        scored, begin = end, begin + stride


def read_inputs(inputs: list[str], tokenizer: Tokenizer, split: str = "val") -> list[Document]:
    """Text files and directories (strict UTF-8, not empty), and prepared datasets (their `split`)."""
    documents = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and (path / "meta.json").is_file():
            documents.append(_prepared_split(path, tokenizer, split))
            continue
        for file in list_text_files([item]):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{file} is not UTF-8 text (byte {err.start} is invalid); convert it to UTF-8 "
                                "(e.g. iconv -f latin1 -t utf-8)") from None
            if not text.strip():
                raise DataError(f"{file} is empty: there is no text to score")
            documents.append(Document(str(file), [tokenizer.eot_id, *tokenizer.encode(text)], len(raw)))
    return documents


def _prepared_split(path: Path, tokenizer: Tokenizer, split: str) -> Document:
    data = TokenData(path)
    if data.tokenizer.vocab != tokenizer.vocab:
        raise DataError(f"{path} was prepared with another tokenizer than the model's")
    if split not in data.shards:
        raise DataError(f"--split must be one of {', '.join(data.shards)}, got {split!r}")
    ids = np.concatenate([np.asarray(shard) for shard in data.shards[split]]).astype(np.int64)
    if len(ids) < 2:
        raise DataError(f"{path} holds {len(ids)} {split} token(s): nothing to score")
    return Document(f"{path}:{split}", ids.tolist(), int(tokenizer.token_bytes[ids[1:]].sum()))


def perplexity(lm: LanguageModel, documents: list[Document], stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> list[Score]:
    """One Score per document (see the module docstring); stride defaults to the model's context."""
    context = lm.model.config.block_size
    stride = context if stride is None else stride
    requests, owners = [], []
    for d, doc in enumerate(documents):
        for begin, end, first in windows(len(doc.ids), context, stride):
            requests.append((doc.ids[begin: end + 1], first))
            owners.append(d)
    with tqdm(total=len(requests), desc="perplexity", unit="window", disable=not progress) as bar:
        scored = score(lm.model, requests, batch_size, bar.update)
    sums = [0.0] * len(documents)
    for owner, result in zip(owners, scored, strict=True):
        sums[owner] -= result.total
    return [Score(doc.name, len(doc.ids) - 1, doc.bytes, nll) for doc, nll in zip(documents, sums, strict=True)]


def total(scores: list[Score]) -> Score:
    return Score("total", sum(s.tokens for s in scores), sum(s.bytes for s in scores), sum(s.nll_sum for s in scores))


def run(ckpt: str, inputs: list[str], stride: int | None = None, batch_size: int = 8, split: str = "val",
        log: Callable[[str], None] = print) -> dict:
    """`gptlab eval perplexity`: a table per input, then the totals (returned, and printed by the CLI)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    lm = LanguageModel.load(ckpt)
    documents = read_inputs(inputs, lm.tokenizer, split)
    scores = perplexity(lm, documents, stride, batch_size)
    log(f"{'input':<40} {'tokens':>9} {'bytes':>10} {'nll':>8} {'ppl':>10} {'bpb':>7}")
    for s in [*scores, total(scores)]:
        row = s.row
        log(f"{row['input'][-40:]:<40} {row['tokens']:>9} {row['bytes']:>10} {row['nll']:>8.4f} "
            f"{row['perplexity']:>10.3f} {row['bits_per_byte']:>7.4f}")
    result = total(scores).row
    del result["input"]
    return {**result, "stride": lm.model.config.block_size if stride is None else stride, "context": lm.model.config.block_size,
            "inputs": len(scores)}
