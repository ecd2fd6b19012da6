"""`gptlab eval harness` against lm-evaluation-harness's own `hf` model on the same weights, offline."""

import json

import pytest

from tests.conftest import run_cli

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which animal barks?", ["a cat", "a dog", "a fish"], 1),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which is the largest planet?", ["Mars", "Venus", "Jupiter", "Mercury"], 2),
    ("What is frozen water called?", ["steam", "ice"], 1),
    ("Which season is the coldest?", ["summer", "spring", "winter", "autumn"], 2),
    ("What do you use to write on paper?", ["a spoon", "a pencil", "a shoe"], 1),
]
TASK = "gptlab_local_mc"


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A multiple-choice lm-eval task whose data is a local JSONL file (no hub)."""
    root = tmp_path_factory.mktemp("tasks")
    with open(root / "mc.jsonl", "w") as handle:
        for question, choices, answer in QUESTIONS:
            handle.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (root / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root


def _per_request(samples: list[dict]) -> dict[tuple[int, int], float]:
    """(doc_id, choice) -> log-likelihood, from lm-eval's logged samples."""
    return {(s["doc_id"], j): float(r[0]) for s in samples for j, r in enumerate(s["filtered_resps"])}


def test_harness_matches_lm_eval_hf_model(hf_gpt2, local_task, monkeypatch):
    _, root = hf_gpt2
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # the reference: lm-eval's own `hf` model on the transformers weights, through the simple_evaluate its command
    # line runs (in process, with the command line's defaults, and indexing only the local task: no process start,
    # no 10-20 s index of lm-eval's own tasks)
    reference = simple_evaluate(model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=[TASK],
                                device="cpu", batch_size=4, log_samples=True,
                                task_manager=TaskManager(include_path=str(local_task), include_defaults=False))
    hf_samples, hf_results = reference["samples"][TASK], reference["results"][TASK]

    # ours on the converted checkpoint, from the command line: the table, then lm-eval's results as the last line
    done = run_cli("eval", "harness", "--ckpt", str(root / "converted.pt"), "--tasks", TASK,
                   "--include-path", str(local_task), "--batch-size", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|acc" in done.stdout  # lm-eval's table
    ours = json.loads(done.stdout.strip().splitlines()[-1])["results"][TASK]
    assert ours["acc,none"] == hf_results["acc,none"] and ours["acc_norm,none"] == hf_results["acc_norm,none"]

    # and per request, in process (lm-eval's logged samples)
    from gptlab.eval import harness
    from gptlab.language_model import LanguageModel

    mine = harness.evaluate(LanguageModel.load(root / "converted.pt"), [TASK], str(local_task), batch_size=5,
                            log_samples=True)
    ours_ll, theirs_ll = _per_request(mine["samples"][TASK]), _per_request(hf_samples)
    assert len(theirs_ll) == sum(len(c) for _, c, _ in QUESTIONS) and ours_ll.keys() == theirs_ll.keys()
    for key, value in theirs_ll.items():
        assert ours_ll[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_rolling_and_generation_requests(hf_gpt2):
    """loglikelihood_rolling of a text longer than the context equals transformers' sum over the same windows
    (lm-eval's: <|endoftext|> first, then disjoint runs of 64 predictions, each with a full context when it can);
    generate_until stops before its `until` string."""
    import torch
    from lm_eval.api.instance import Instance

    from gptlab.eval import harness
    from gptlab.language_model import LanguageModel

    hf_model, root = hf_gpt2
    lm = LanguageModel.load(root / "converted.pt")
    model = harness.make_lm(lm, batch_size=4)
    text = "The quick brown fox jumps over the lazy dog. " * 16
    (rolling,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.tokenizer.eot_id, *lm.tokenizer.encode(text)]
    n = len(ids) - 1
    assert n > 2 * 64 and n % 64  # several windows and a last partial one
    expected = 0.0
    for start in range(1, n + 1, 64):  # predict ids[start..end] from the 64 tokens before end at most
        end = min(start + 63, n)
        begin = max(0, end - 64)
        with torch.no_grad():
            logp = hf_model(torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
        targets = torch.tensor(ids[begin + 1: end + 1])
        expected += logp.gather(1, targets[:, None])[start - begin - 1:, 0].sum().item()
    assert rolling == pytest.approx(expected, rel=1e-5)
    (generated,) = model.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": ["e"],
                                                                                             "max_gen_toks": 20}), 0)])
    assert "e" not in generated


def test_unknown_task_is_one_line_exit_2(hf_gpt2, local_task):
    _, root = hf_gpt2
    done = run_cli("eval", "harness", "--ckpt", str(root / "converted.pt"), "--tasks", "no_such_task",
                   "--include-path", str(local_task))
    assert done.returncode == 2 and done.stderr.startswith("gptlab: error: unknown lm-eval task 'no_such_task'")
    assert len(done.stderr.strip().splitlines()) == 1
