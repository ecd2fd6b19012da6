"""How a byte-level BPE cuts Chinese: `bpe:N` (GPT-2's pre-tokenisation) vs `bpe-han:N` (one Han character a word).

    gptlab data build peoples-daily-ner
    python benchmarks/zh_tokens.py [--data data/peoples-daily-ner] [--vocab 8192] [--sentences 2000]

Trains both on the builder's corpus.txt (no test sentence in it) and reads the first test sentences, whose words
are gold-segmented. Prints one JSON line per tokenizer: characters per token of the running text, the share of its
tokens that cross a word boundary (pretraining sees these; the tagger, which encodes each word on its own, never
does), and the share of sentences whose word-by-word encoding equals the running-text encoding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptlab import tokenizer as tok
from gptlab.finetune.data import word_pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/peoples-daily-ner")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sentences", type=int, default=2000)
    args = parser.parse_args()
    data = Path(args.data)
    texts = (data / "corpus.txt").read_text(encoding="utf-8").splitlines()
    with open(data / "test.jsonl", encoding="utf-8") as f:
        sentences = [json.loads(line)["tokens"] for line, _ in zip(f, range(args.sentences), strict=False)]
    for han_chars in (False, True):
        tokenizer = tok.train(texts, args.vocab, show_progress=False, han_chars=han_chars)
        chars = tokens = crossing = same = 0
        for words in sentences:
            ids = tokenizer.encode("".join(words))
            ends, end = set(), 0
            for word in words:
                end += len(word.encode())
                ends.add(end)
            start = 0
            for i in ids:
                stop = start + len(tokenizer.decode_bytes([i]))
                crossing += any(start < e < stop for e in ends)
                start = stop
            chars += sum(map(len, words))
            tokens += len(ids)
            same += [t for piece in word_pieces(words, tokenizer) for t in piece] == ids
        print(json.dumps({"tokenizer": tokenizer.name, "sentences": len(sentences), "chars_per_token": chars / tokens,
                          "tokens_crossing_a_word_boundary": crossing / tokens,
                          "sentences_encoded_alike_word_by_word": same / len(sentences)}))


if __name__ == "__main__":
    main()
