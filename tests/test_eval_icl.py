"""`gptlab eval icl`: k-shot prompts, multiple-choice scores against transformers, open tasks, bad input."""

import json

import pytest
import torch

from gptlab import synthetic
from gptlab.eval import icl, tasks
from tests.conftest import run_cli

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("Cuba", "Havana")]


@pytest.fixture(scope="module")
def capitals_task(tmp_path_factory):
    """A multiple-choice task in a YAML + JSONL of its own; the pool is the other records of the same file."""
    root = tmp_path_factory.mktemp("icl-task")
    cities = [city for _, city in CAPITALS]
    with open(root / "capitals.jsonl", "w") as handle:
        for i, (country, city) in enumerate(CAPITALS):
            others = [c for c in cities if c != city][i % 7: i % 7 + 2]
            handle.write(json.dumps({"country": country, "city": city, "choices": [city, *others]}) + "\n")
    (root / "capitals.yaml").write_text(
        'instruction: "Name the capital."\ninput_template: "Country: {input}\\nCapital:"\nanswer_template: " {answer}"\n'
        'separator: "\\n\\n"\nmetric: acc\nexamples: {file: capitals.jsonl, fields: {input: country, answer: city}}\n')
    return root / "capitals.yaml"


def test_demonstrations_never_hold_the_query_and_depend_on_the_seed(capitals_task):
    task = tasks.load(str(capitals_task))
    queries, pool = task.load_examples()
    assert pool is queries
    for i, query in enumerate(queries):
        demos = icl.draw(pool, 9, seed=0, query_index=i, query=query, shared=True)
        assert query not in demos and len(demos) == 9
    assert icl.draw(pool, 4, 0, 0, queries[0], True) != icl.draw(pool, 4, 1, 0, queries[0], True)
    for record in synthetic.mapping_records(seed=5, count=20):  # own pools: the query's word is shown, not the query
        assert sum(d["input"] == record["input"] for d in record["demos"]) == 3


def test_multiple_choice_scores_equal_transformers(hf_gpt2, capitals_task):
    """acc and acc_norm of a 2-shot run equal the argmax of transformers' log-likelihoods of the same prompts."""
    hf_model, root = hf_gpt2
    cfg = icl.IclConfig(task=str(capitals_task), shots=[2], seeds=1, batch_size=4)
    lines = list(icl.run(str(root / "converted.pt"), cfg, log=lambda _: None))
    (run,) = [line for line in lines if not line.get("summary")]
    from gptlab import tokenizer as tok

    gpt2 = tok.load("gpt2")
    task = tasks.load(str(capitals_task))
    queries, pool = task.load_examples()
    correct, correct_norm = 0, 0
    for i, query in enumerate(queries):
        demos = icl.draw(pool, 2, 0, i, query, shared=True)
        prompt = icl.build_prompt(task, demos, query["input"], lambda _: True).text
        context = gpt2.encode(prompt)
        scores = []
        for choice in query["choices"]:
            answer = gpt2.encode(task.answer(choice))
            with torch.no_grad():
                logp = hf_model(torch.tensor([context + answer])).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(answer)))
        best = max(range(len(scores)), key=scores.__getitem__)
        best_norm = max(range(len(scores)), key=lambda j: scores[j] / len(task.answer(query["choices"][j])))
        correct += query["choices"][best] == query["answer"]
        correct_norm += query["choices"][best_norm] == query["answer"]
    assert run["acc"] == correct / len(queries) and run["acc_norm"] == correct_norm / len(queries)


def test_cli_table_curve_and_dropped_demonstrations(hf_gpt2, capitals_task, tmp_path):
    """A 64-token context cannot hold 8 demonstrations: they are dropped (and counted); the run writes its
    JSON lines, results.jsonl and a PNG curve; calibration adds acc_calibrated."""
    _, root = hf_gpt2
    done = run_cli("eval", "icl", "--ckpt", str(root / "converted.pt"), "--task", str(capitals_task), "--shots", "0,8",
                   "--seeds", "2", "--calibrate", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summaries = {line["k"]: line for line in lines if line.get("summary")}
    assert summaries[0]["seeds"] == 1 and summaries[8]["seeds"] == 2  # k=0 prompts do not depend on the seed
    assert summaries[0]["dropped_demonstrations"] == 0 and summaries[8]["dropped_demonstrations"] > 0
    assert "demonstration(s) dropped" in done.stdout
    assert all(0 <= summaries[k][m] <= 1 for k in (0, 8) for m in ("acc", "acc_norm", "acc_calibrated"))
    assert (tmp_path / "out" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 5


def test_open_task_decodes_to_the_separator(hf_gpt2):
    """digit-permutation (exact match) on the shared decoding engine: the prediction ends at the separator."""
    _, root = hf_gpt2
    from gptlab.language_model import LanguageModel

    task = tasks.load("digit-permutation")
    lm = LanguageModel.load(root / "converted.pt")
    cfg = icl.IclConfig(task="digit-permutation", shots=[4], seeds=1, limit=6, max_new_tokens=8)
    queries, _ = task.load_examples()
    scores, dropped = icl._evaluate(lm, task, queries[:6], None, 4, 0, cfg)
    assert set(scores) == {"exact_match"} and 0 <= scores["exact_match"] <= 1 and dropped == 0


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown task 'no-such-task'"),
    ("missing", "missing field 'separator'"),
    ("too-many", "k=20 is larger than the pool of 9 demonstrations"),
])
def test_bad_input_is_one_line_exit_2(hf_gpt2, capitals_task, tmp_path, capsys, case, message):
    """The command's error path in process (a real `gptlab eval icl` subprocess runs in the test above)."""
    from gptlab.cli import main

    _, root = hf_gpt2
    task, shots = str(capitals_task), "0,1"
    if case == "unknown":
        task = "no-such-task"
    elif case == "missing":
        broken = tmp_path / "broken.yaml"
        broken.write_text("\n".join(line for line in capitals_task.read_text().splitlines()
                                    if not line.startswith("separator")))
        task = str(broken)
    else:
        shots = "0,20"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "icl", "--ckpt", str(root / "converted.pt"), "--task", task, "--shots", shots])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("gptlab: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_builtin_tasks_load_and_list():
    names = set(tasks.builtin_tasks())
    assert {"random-mapping", "digit-permutation", "copy", "reversal", "sentiment-en", "sentiment-zh",
            "zh-en-dictionary", "dates"} <= names
    queries, pool = tasks.load("random-mapping").load_examples()
    assert pool is None and all(len(q["choices"]) == 2 and q["answer"] in q["choices"] for q in queries)
