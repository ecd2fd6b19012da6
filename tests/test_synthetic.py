"""The random in-context tasks: consistent mappings, pools that hold the answer but never the query record."""

import re

from gptlab import synthetic
from gptlab.datasets import SOURCES

LINE = re.compile(r"^(\w+) -> (\w+)$")


def test_pretrain_episodes_are_consistent_random_mappings():
    episodes = list(synthetic.pretrain_episodes(seed=3, count=200))
    assert episodes == list(synthetic.pretrain_episodes(seed=3, count=200))  # seeded
    mappings = set()
    for episode in episodes:
        lines = episode.split("\n")
        assert 8 <= len(lines) <= 40
        mapping: dict[str, str] = {}
        for line in lines:
            word, label = LINE.match(line).groups()
            assert word in synthetic.WORDS and label in synthetic.LABELS
            assert mapping.setdefault(word, label) == label  # one label per word within an episode
        assert 1 <= len(mapping) <= 8  # the words shown (each episode maps 2-8 words)
        mappings.add(tuple(sorted(mapping.items())))
    assert len(mappings) == len(episodes)  # a fresh task every episode
    assert SOURCES["icl-pretrain"].task == "text"


def test_mapping_records_pool_shows_the_answer():
    for record in synthetic.mapping_records(seed=7, count=50):
        shown = {d["answer"] for d in record["demos"] if d["input"] == record["input"]}
        assert shown == {record["answer"]} and record["answer"] in record["choices"]
        assert sorted(d["answer"] for d in record["demos"]).count(record["choices"][0]) == 6  # 2 words x 3 copies


def test_permutation_pool_never_shows_the_query_digit():
    for record in synthetic.permutation_records(seed=2, count=30):
        assert record["input"] not in {d["input"] for d in record["demos"]} and len(record["demos"]) == 9


def test_repeated_sequences_say_a_random_word_sequence_twice():
    documents = list(synthetic.repeated_sequences(seed=4, count=100, lengths=(4, 24)))
    assert documents == list(synthetic.repeated_sequences(seed=4, count=100, lengths=(4, 24)))  # seeded
    lengths = set()
    for document in documents:
        words = document.split(" ")
        half = len(words) // 2
        assert words[:half] == words[half:] and set(words) <= set(synthetic.WORDS)
        lengths.add(half)
    assert min(lengths) >= 4 and max(lengths) <= 24 and len(lengths) > 5  # the repeat distance varies
    assert SOURCES["induction-repeats"].task == "text"
