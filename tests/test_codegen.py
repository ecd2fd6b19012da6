"""Code generation scoring: the sandbox, the pass@k estimator, HumanEval and synthetic-functions tasks."""

import json
import socket
from collections import Counter
from itertools import combinations

import pytest

from gptlab import cli, code_datasets, codegen
from gptlab.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=8, cpu_s=2, memory_mb=512)


def test_a_passing_and_a_failing_program():
    assert run_python("from typing import List\nimport math\nassert math.gcd(12, 18) == 6\n", LIMITS).passed
    outcome = run_python("assert sorted([2, 1]) == [2, 1]\n", LIMITS)
    assert (outcome.passed, outcome.status, outcome.detail) == (False, "failed", "AssertionError")


def test_a_program_that_never_ends_is_stopped():
    outcome = run_python("while True:\n    pass\n", LIMITS)
    assert not outcome.passed and outcome.status == "timeout"


def test_a_program_that_allocates_10_gb_fails_with_memory_error():
    outcome = run_python("block = bytearray(10 * 1024 ** 3)\n", LIMITS)
    assert not outcome.passed and outcome.detail == "MemoryError"


def test_a_program_cannot_delete_or_overwrite_the_hosts_files(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for attack in (f"import os\nos.remove({str(victim)!r})\n", f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                   f"import pathlib\npathlib.Path({str(victim)!r}).unlink()\n",
                   f"open({str(victim)!r}, 'w').write('gone')\n"):
        assert not run_python(attack, LIMITS).passed, attack
    assert victim.read_text() == "precious"


def test_a_program_cannot_reach_the_network():
    """A real listening socket on 127.0.0.1: the program's connection attempt fails and never arrives."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        outcome = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n", LIMITS)
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # a connection that had arrived would be waiting in the backlog
    assert not outcome.passed and outcome.status == "failed"


def test_pass_at_k_is_the_probability_that_k_of_n_samples_include_a_pass():
    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (10, 1, 10), (4, 4, 2)]:
        draws = list(combinations([True] * c + [False] * (n - c), k))
        assert codegen.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws)), (n, c, k)
    assert codegen.pass_at_k(200, 7, 1) == pytest.approx(7 / 200)


@pytest.mark.parametrize("reference, expected", [("canonical", 1.0), ("pass", 0.0)])
def test_humaneval_reference_solutions_pass_and_empty_bodies_fail(tmp_path, capsys, reference, expected):
    cli.main(["eval", "code", "--reference", reference, "--tasks", "humaneval", "--max-tasks", "3",
              "--out", str(tmp_path / "rows.jsonl")])
    assert json.loads(capsys.readouterr().out) == {"tasks": 3, "samples": 1, "pass@1": expected}
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(3)]


def test_synthetic_functions_canonical_solutions_pass_their_tests():
    records = [record for _, record in code_datasets.synthetic_functions(Counter())]
    one_per_family = [r for r in records if r["entry_point"].endswith("_7")]
    assert len(one_per_family) == len(code_datasets.FUNCTION_FAMILIES)
    for record in one_per_family:  # the SFT view and the task view are the same program
        assert record["instruction"] + "\n" + record["output"] + "\n" == record["prompt"] + record["canonical_solution"]
    result = codegen.score(one_per_family, [[r["canonical_solution"]] for r in one_per_family], [1], LIMITS,
                           log=lambda _: None)
    assert result["pass@1"] == 1.0
    wrong = [["    return None\n"] for _ in one_per_family]
    assert codegen.score(one_per_family, wrong, [1], LIMITS, log=lambda _: None)["pass@1"] == 0.0


def test_a_task_without_tests_and_bad_flags_are_one_line(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "entry_point": "f", "test": ""}) + "\n")
    for args, needle in [(["--reference", "canonical", "--tasks", str(tasks)], "task 't/0' has no tests"),
                         (["--reference", "pass", "--tasks", str(tmp_path / "none.jsonl")], "task file not found"),
                         (["--tasks", "humaneval"], "give either --ckpt"),
                         (["--reference", "pass", "-k", "0"], "positive integers")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "code", *args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.startswith("gptlab: error: ") and needle in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1


def test_summarization_baselines_score_the_first_line_or_the_name(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    records = [{"instruction": "Summarize.", "input": "def read_config_file(path):\n    return open(path).read()",
                "output": "Read the config file at path."},
               {"instruction": "Summarize.", "input": "def isEmpty(xs):\n    return not xs", "output": "Is it empty?"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli.main(["eval-task", "--baseline", "name", "--data", str(data)])
    name = json.loads(capsys.readouterr().out)
    # "read config file" vs "read the config file at path": LCS 3, P 3/3, R 3/6; "is empty" vs "is it empty": 2/2, 2/3
    assert name["rouge_l"] == pytest.approx((2 * 1 * 0.5 / 1.5 + 2 * 1 * (2 / 3) / (5 / 3)) / 2)
    cli.main(["eval-task", "--baseline", "lead", "--data", str(data)])
    lead = json.loads(capsys.readouterr().out)
    # lead: "def read config file path" (4 of 5 words in order: F 8/11) and "def isempty xs" (nothing in common)
    assert lead["items"] == 2 and lead["rouge_l"] == pytest.approx((8 / 11 + 0) / 2)
