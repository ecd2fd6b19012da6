"""Training-data hygiene before tokenization: PII scrubbing, exact and near-duplicate removal, canaries.

- `scrub_pii`: e-mail addresses, phone numbers, IP addresses, card numbers that pass the Luhn check and
  IBANs that pass their mod-97 check become typed placeholders (`<EMAIL>`, ...).
- `Deduplicator`: `exact` drops a document whose text was seen before; `near` also drops one whose MinHash
  (word 5-gram shingles) puts it above a Jaccard threshold of an earlier one (datasketch's MinHash LSH, the
  standard of dataset pipelines such as BigCode's and text-dedup).
- `make_canaries`: random secrets of a fixed format ("the secret number of qvxka is 4 8 1 5 9 2") inserted
  into the training split `repeats` times each (Carlini et al. 2019, "The Secret Sharer"); `gptlab audit
  memorization` measures their exposure.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
from dataclasses import asdict, dataclass

from gptlab.errors import GptlabError, require_package

# --- PII -----------------------------------------------------------------------------------------------
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\d.])|\b(?:[0-9A-Fa-f]{{1,4}}:){{7}}[0-9A-Fa-f]{{1,4}}\b")
# an optional country code, an optional area code in parentheses, then groups of digits: 9-15 digits in all
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")

PII_TYPES = ("iban", "credit_card", "email", "ip_address", "phone")  # the order they are looked for in


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


_CHECKS = {
    "iban": (_IBAN, iban_valid),
    "credit_card": (_CARD, lambda m: 13 <= len(_digits(m)) <= 19 and luhn_valid(_digits(m))),
    "email": (_EMAIL, lambda m: True),
    "ip_address": (_IP, lambda m: True),
    "phone": (_PHONE, lambda m: 9 <= len(_digits(m)) <= 15),
}


def scrub_pii(text: str) -> tuple[str, collections.Counter]:
    """`text` with every PII match replaced by `<TYPE>`, and the count of replacements per type."""
    counts: collections.Counter = collections.Counter()
    for kind in PII_TYPES:
        pattern, valid = _CHECKS[kind]

        def replace(match: re.Match, kind: str = kind, valid=valid) -> str:
            if not valid(match.group()):
                return match.group()
            counts[kind] += 1
            return f"<{kind.upper()}>"
        text = pattern.sub(replace, text)
    return text, counts


# --- duplicates -------------------------------------------------------------------------------------------
DEDUP_MODES = ("exact", "near")


class Deduplicator:
    """Decides document by document, in corpus order, whether a document repeats an earlier one."""

    def __init__(self, mode: str, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5) -> None:
        if mode not in DEDUP_MODES:
            raise GptlabError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {mode!r}")
        self.mode, self.num_perm, self.shingle = mode, num_perm, shingle
        self.seen: set[bytes] = set()
        self.removed = collections.Counter()
        if mode == "near":
            require_package("datasketch", "pip install 'gptlab[audit]'", "--dedup near")
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def is_duplicate(self, name: str, text: str) -> bool:
        digest = hashlib.sha256(text.strip().encode()).digest()
        if digest in self.seen:
            self.removed["exact"] += 1
            return True
        self.seen.add(digest)
        if self.mode == "near":
            signature = self._minhash(text)
            if self.lsh.query(signature):
                self.removed["near"] += 1
                return True
            self.lsh.insert(name, signature)
        return False

    def _minhash(self, text: str):
        from datasketch import MinHash

        words = re.findall(r"\w+", text.lower())
        shingles = {" ".join(words[i: i + self.shingle]) for i in range(max(1, len(words) - self.shingle + 1))}
        signature = MinHash(num_perm=self.num_perm, seed=1)
        signature.update_batch([s.encode() for s in shingles])
        return signature


# --- canaries ---------------------------------------------------------------------------------------------
SECRET_DIGITS = 6  # the secret space: 10**6 numbers


@dataclass(frozen=True)
class Canary:
    prefix: str  # "the secret number of qvxka is"
    secret: str  # "4 8 1 5 9 2": the text is prefix + " " + secret
    repeats: int

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"


def random_secret(rng: random.Random) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(SECRET_DIGITS))


def make_canaries(per_group: int, repeats: list[int], seed: int = 0) -> list[Canary]:
    """`per_group` canaries for each repeat count, each with its own random name and secret."""
    if per_group < 1 or not repeats or any(r < 1 for r in repeats):
        raise GptlabError(f"--canaries must be >= 1 and --canary-repeats positive integers, got {per_group} and {repeats}")
    rng = random.Random(seed)
    canaries = []
    for count in repeats:
        for _ in range(per_group):
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
            canaries.append(Canary(f"the secret number of {name} is", random_secret(rng), count))
    return canaries


def canary_records(canaries: list[Canary]) -> list[dict]:
    return [asdict(c) for c in canaries]


# --- all of it, over a corpus -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CleanConfig:
    """What `gptlab prepare --dedup MODE --scrub-pii --canaries N --canary-repeats 1,4,16,64` does."""

    dedup: str | None = None
    scrub_pii: bool = False
    canaries: int = 0  # canaries per repeat count (0: none)
    canary_repeats: tuple[int, ...] = (1, 4, 16, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dedup is not None and self.dedup not in DEDUP_MODES:
            raise GptlabError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if self.canaries < 0 or not self.canary_repeats or any(r < 1 for r in self.canary_repeats):
            raise GptlabError(f"--canaries must be >= 0 and --canary-repeats positive integers, got "
                              f"{self.canaries} and {list(self.canary_repeats)}")

    @property
    def active(self) -> bool:
        return self.dedup is not None or self.scrub_pii or self.canaries > 0


class Cleaner:
    """`plan` reads the corpus once (which documents repeat earlier ones, how much PII there is);
    `place_canaries` says where the canaries go; `apply` then gives the cleaned stream of (name, text) as often as it is asked for."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.dropped: set[str] = set()
        self.kept: list[tuple[int, str]] = []  # (position, name) of each document that is not a duplicate
        self.pii: collections.Counter = collections.Counter()
        self.duplicates: collections.Counter = collections.Counter()
        self.canaries = make_canaries(config.canaries, list(config.canary_repeats), config.seed) \
            if config.canaries else []
        self.insert_after: dict[int, list[tuple[str, str]]] = {}

    def plan(self, documents) -> None:
        """documents: iterable of (name, text). Records which repeat earlier ones and how much PII there is;
        `kept` lists the names of the others in order."""
        dedup = Deduplicator(self.config.dedup) if self.config.dedup else None
        for index, (name, text) in enumerate(documents):
            if dedup is not None and dedup.is_duplicate(name, text):
                self.dropped.add(name)
                continue
            if self.config.scrub_pii:
                self.pii.update(scrub_pii(text)[1])
            self.kept.append((index, name))
        if dedup is not None:
            self.duplicates = dedup.removed

    def place_canaries(self, is_val) -> None:
        """Each canary copy goes after a random kept training document (is_val(name): held-out documents
        get none), spread over the corpus."""
        train_positions = [index for index, name in self.kept if not is_val(name)]
        rng = random.Random(self.config.seed + 1)
        copies = [(f"canary:{i}:{j}", c.text) for i, c in enumerate(self.canaries) for j in range(c.repeats)]
        rng.shuffle(copies)
        for copy in copies:
            self.insert_after.setdefault(rng.choice(train_positions or [-1]), []).append(copy)

    def apply(self, documents):
        yield from self.insert_after.get(-1, [])
        for index, (name, text) in enumerate(documents):
            if name not in self.dropped:
                yield name, scrub_pii(text)[0] if self.config.scrub_pii else text
            yield from self.insert_after.get(index, [])

    def summary(self) -> dict:
        """What meta.json records (and the log shows)."""
        out: dict = {}
        if self.config.dedup:
            out["dedup"] = {"mode": self.config.dedup, "removed_exact": self.duplicates["exact"],
                            "removed_near": self.duplicates["near"]}
        if self.config.scrub_pii:
            out["pii_replaced"] = {kind: self.pii[kind] for kind in PII_TYPES}
        if self.canaries:
            out["canaries"] = canary_records(self.canaries)
        return out
