"""Data hygiene: PII of every type is scrubbed, planted duplicates go, clean text is left exactly as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gptlab.cleaning import CleanConfig, Deduplicator, iban_valid, luhn_valid, make_canaries, scrub_pii
from gptlab.data import TokenData
from tests.conftest import run_cli, run_clis

PLANTED_PII = {
    "email": ["jane.doe@example.com", "ops+alerts@mail.example.co.uk"],
    "phone": ["+1 (415) 555-2671", "020 7946 0958", "+44 20 7946 0958"],
    "ip_address": ["192.168.10.24", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    "credit_card": ["4111 1111 1111 1111", "5500-0000-0000-0004"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"],
}
PII_TEXT = ("Contact jane.doe@example.com or ops+alerts@mail.example.co.uk today.\n"
            "Call +1 (415) 555-2671, or 020 7946 0958, or +44 20 7946 0958 after six.\n"
            "The server at 192.168.10.24 and 2001:0db8:85a3:0000:0000:8a2e:0370:7334 logged it.\n"
            "Paid with 4111 1111 1111 1111 and 5500-0000-0000-0004.\n"
            "Wire it to DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432.\n")


def test_scrub_pii_replaces_every_type_with_its_placeholder():
    text, counts = scrub_pii(PII_TEXT)
    assert dict(counts) == {kind: len(values) for kind, values in PLANTED_PII.items()}
    for values in PLANTED_PII.values():
        for value in values:
            assert value not in text
    assert text.startswith("Contact <EMAIL> or <EMAIL> today.\nCall <PHONE>, or <PHONE>, or <PHONE> after six.")
    assert "at <IP_ADDRESS> and <IP_ADDRESS> logged" in text and "with <CREDIT_CARD> and <CREDIT_CARD>." in text
    assert text.endswith("to <IBAN> or <IBAN>.\n")


def test_scrub_pii_leaves_look_alikes_alone():
    # a 16-digit number that fails the Luhn check, an IBAN with a wrong check digit, a date, a version number,
    # a short number, a year range
    text = ("Order 4111 1111 1111 1112, account DE88 3704 0044 0532 0130 00, on 2024-01-15, "
            "version 1.2.3.4.5, room 101, 1564-1616.")
    assert not luhn_valid("4111111111111112") and not iban_valid("DE88370400440532013000")
    assert scrub_pii(text) == (text, {})


def test_near_duplicates_need_minhash_and_exact_ones_do_not():
    original = " ".join(f"word{i} line{i % 7}" for i in range(300))
    edited = original.replace("word10 ", "wort10 ").replace("word200 ", "")
    exact = Deduplicator("exact")
    assert [exact.is_duplicate(n, t) for n, t in [("a", original), ("b", edited), ("c", original)]] == [False, False, True]
    near = Deduplicator("near")
    assert [near.is_duplicate(n, t) for n, t in [("a", original), ("b", edited), ("c", "something else " * 50)]] \
        == [False, True, False]
    assert dict(near.removed) == {"near": 1}


def test_canaries_have_the_fixed_format_and_bad_settings_are_refused():
    canaries = make_canaries(2, [1, 4], seed=3)
    assert [c.repeats for c in canaries] == [1, 1, 4, 4]
    assert len({c.prefix for c in canaries}) == 4
    for c in canaries:
        assert c.prefix.startswith("the secret number of ") and len(c.secret.split()) == 6
    with pytest.raises(ValueError, match="canary-repeats"):
        CleanConfig(canaries=1, canary_repeats=(0,))


def _documents(directory) -> list[str]:
    """Every document of both splits, decoded from the token files."""
    data = TokenData(directory)
    docs = []
    for split in ("train", "val"):
        ids = np.concatenate([np.asarray(shard) for shard in data.shards[split]]).tolist()
        current: list[int] = []
        for token in ids:
            if token == data.tokenizer.eot_id:
                docs.append(data.tokenizer.decode(current))
                current = []
            else:
                current.append(token)
    return docs


# Known bug (found by CI on 2026-12-03, not yet fixed): document names hold the file's full path, so the hashed
# validation split depends on the temporary directory; when it picks only a planted duplicate, cleaning removes
# it and prepare finds no validation document. Fix: choose the validation documents after cleaning.
def test_prepare_cleans_planted_items_and_leaves_the_corpus_untouched(corpus_dir, tmp_path):
    planted = tmp_path / "planted"
    shutil.copytree(corpus_dir, planted)
    plays = sorted(planted.glob("*.txt"))
    shutil.copy(plays[0], planted / "zz-exact-copy.txt")
    words = plays[1].read_text().split(" ")
    for i in range(50, len(words), 400):  # lightly edited: one word in 400 changed
        words[i] = words[i].upper()
    (planted / "zz-edited-copy.txt").write_text(" ".join(words))
    (planted / "zz-pii.txt").write_text(PII_TEXT)

    runs = [(corpus_dir, "plain"), (corpus_dir, "clean", "--dedup", "near", "--scrub-pii"),
            (planted, "planted", "--dedup", "near", "--scrub-pii")]
    results = run_clis(*[("prepare", "--input", str(source), "--tokenizer", "gpt2", "--out", str(tmp_path / out),
                          *flags) for source, out, *flags in runs])  # three independent processes at once
    for result in results:
        assert result.returncode == 0, result.stderr
    (plain, _), (cleaned_clean, _), (cleaned, log) = [
        (json.loads((tmp_path / out / "meta.json").read_text()), result.stderr)
        for (_, out, *_), result in zip(runs, results, strict=True)]

    # clean text untouched: the same documents and token counts with and without cleaning
    assert sorted(_documents(tmp_path / "clean")) == sorted(_documents(tmp_path / "plain"))
    for split in ("train", "val"):
        assert cleaned_clean[f"{split}_tokens"] == plain[f"{split}_tokens"]
    # the planted corpus: the duplicates are gone, the PII document is there only scrubbed
    scrubbed = scrub_pii(PII_TEXT)[0]
    assert sorted(_documents(tmp_path / "planted")) == sorted([*_documents(tmp_path / "plain"), scrubbed])
    text = "".join(_documents(tmp_path / "planted"))
    for values in PLANTED_PII.values():
        for value in values:
            assert value not in text
    assert cleaned["dedup"] == {"mode": "near", "removed_exact": 1, "removed_near": 1}
    assert cleaned["pii_replaced"] == {kind: len(values) for kind, values in PLANTED_PII.items()}
    assert '"removed_exact": 1' in log and '"email": 2' in log
    from gptlab.tokenizer import load
    extra = len(load("gpt2").encode(scrubbed)) + 1
    assert cleaned["train_tokens"] + cleaned["val_tokens"] == plain["train_tokens"] + plain["val_tokens"] + extra


def test_prepare_refuses_bad_canary_repeats_in_one_line(tmp_path):
    result = run_cli("prepare", "--canaries", "2", "--canary-repeats", "1,x", "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--canary-repeats" in result.stderr and not (tmp_path / "d").exists()
