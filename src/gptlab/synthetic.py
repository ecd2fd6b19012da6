"""Synthetic in-context tasks: problems a model can only solve from the demonstrations in its prompt.

Each prompt draws a fresh random task (a word -> label mapping, a digit permutation, ...), so nothing
about the answer can have been memorised in pretraining. Three users:
- `gptlab data build icl-pretrain` (gptlab.datasets): a pretraining corpus of episodes, each a run of
  demonstrations `input -> answer` of one freshly drawn mapping (the setting of Chan et al. 2022,
  Garg et al. 2022 and the induction heads of Olsson et al. 2022);
- `gptlab data build induction-repeats`: random word sequences said twice, the plainest corpus that grows
  induction heads (docs/INSPECT.md);
- the built-in `gptlab eval icl` tasks (gptlab.eval.tasks): query records, each with its own pool of
  demonstrations of the same random task (the pool never holds the query itself).

Every function is seeded: the same seed gives the same records.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# one BPE token each once a tokenizer is trained on the corpus: the model's job is matching, not spelling
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "chair", "bread", "lamp", "horse", "glass", "music", "paper",
    "train", "forest", "window", "garden", "silver", "candle", "mirror", "rabbit", "pencil", "orange", "bottle",
    "castle", "dragon", "island", "jacket", "ladder", "monkey", "needle", "planet", "rocket", "saddle", "tunnel",
    "violin", "wallet", "anchor", "basket", "butter", "carpet", "coffee", "desert", "engine", "finger", "hammer",
    "kettle", "lemon", "marble", "onion", "pillow", "rubber", "shadow", "spider", "ticket", "turtle", "valley",
    "wagon", "zebra", "barrel", "button", "cherry", "cotton", "feather", "harbor", "helmet", "insect", "jungle",
    "kitten", "meadow", "oyster", "parrot", "pepper", "puzzle", "ribbon", "salmon", "spoon", "thunder", "tomato",
    "wheel", "whistle", "camel", "eagle", "falcon", "ginger", "honey", "iron", "lizard", "maple", "nickel",
    "olive", "peach", "quilt", "robin", "sugar", "tulip", "walnut", "yacht", "badger", "copper", "dolphin",
)
LABELS = ("red", "blue", "green", "yellow", "north", "south", "east", "west", "yes", "no", "up", "down",
          "left", "right", "hot", "cold")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

Record = dict  # {"input", "answer", "choices"?, "demos"?: [{"input", "answer"}, ...]}


def random_mapping(rng: random.Random, n_words: int, n_labels: int) -> dict[str, str]:
    """n_words distinct words, each given one of n_labels distinct labels, every label used."""
    words = rng.sample(WORDS, n_words)
    labels = rng.sample(LABELS, n_labels)
    assigned = labels + [rng.choice(labels) for _ in range(n_words - n_labels)]
    rng.shuffle(assigned)
    return dict(zip(words, assigned, strict=True))


def demonstration(pair: tuple[str, str]) -> str:
    """The one format of the corpus and the built-in synthetic tasks (their YAML templates match it)."""
    return f"{pair[0]} -> {pair[1]}"


def pretrain_episodes(seed: int, count: int) -> Iterator[str]:
    """`count` episodes: each a random mapping (2-8 words onto 2-4 labels) shown by 8-40 demonstrations,
    one a line. Most words repeat within an episode, so its later labels are predictable from its earlier
    lines alone: that is what the model has to learn."""
    rng = random.Random(seed)
    for _ in range(count):
        n_words = rng.randint(2, 8)
        mapping = random_mapping(rng, n_words, rng.randint(2, min(4, n_words)))
        words = list(mapping)
        lines = [demonstration((w, mapping[w])) for w in (rng.choice(words) for _ in range(rng.randint(8, 40)))]
        yield "\n".join(lines)


def repeated_sequences(seed: int, count: int, lengths: tuple[int, int] = (4, 24)) -> Iterator[str]:
    """`count` documents, each a random sequence of WORDS (its length drawn from `lengths`) said twice.
    The second half is predictable only by finding the current word's earlier occurrence and copying the
    word after it (an induction head, Olsson et al. 2022); the length varies so that a head attending a
    fixed distance back cannot do the same job."""
    rng = random.Random(seed)
    for _ in range(count):
        sequence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths)))
        yield f"{sequence} {sequence}"


def mapping_records(seed: int, count: int, n_words: int = 4, copies: int = 3) -> list[Record]:
    """Multiple-choice queries of held-out random mappings: `n_words` words onto two labels (two words each),
    a pool of `copies` demonstrations of every word, and a query on one of them; choices: the two labels."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        words = rng.sample(WORDS, n_words)
        labels = rng.sample(LABELS, 2)
        assigned = [labels[i % 2] for i in range(n_words)]
        rng.shuffle(assigned)
        mapping = dict(zip(words, assigned, strict=True))
        pool = [{"input": w, "answer": mapping[w]} for w in words for _ in range(copies)]
        rng.shuffle(pool)
        query = rng.choice(words)
        records.append({"input": query, "answer": mapping[query], "choices": labels, "demos": pool})
    return records


def permutation_records(seed: int, count: int) -> list[Record]:
    """Open queries: a random permutation of the ten digits per record; its pool shows every other digit."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        image = list("0123456789")
        rng.shuffle(image)
        query = str(rng.randrange(10))
        pool = [{"input": str(d), "answer": image[d]} for d in range(10) if str(d) != query]
        rng.shuffle(pool)
        records.append({"input": query, "answer": image[int(query)], "demos": pool})
    return records


def _string_records(seed: int, count: int, transform) -> list[Record]:
    rng = random.Random(seed)

    def draw() -> str:
        return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))

    records = []
    for _ in range(count):
        query = draw()
        pool = [{"input": s, "answer": transform(s)} for s in (draw() for _ in range(16)) if s != query]
        records.append({"input": query, "answer": transform(query), "demos": pool})
    return records


def copy_records(seed: int, count: int) -> list[Record]:
    """Open queries: repeat a random string of 3-5 letters."""
    return _string_records(seed, count, lambda s: s)


def reversal_records(seed: int, count: int) -> list[Record]:
    """Open queries: a random string of 3-5 letters, reversed."""
    return _string_records(seed, count, lambda s: " ".join(reversed(s.split())))


GENERATORS = {"random-mapping": mapping_records, "digit-permutation": permutation_records,
              "copy": copy_records, "reversal": reversal_records}
