"""`wmtp eval`, `wmtp execute` and `wmtp report` end to end on a tiny trained model; generation details."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from tiny_run import files, train_args

from wmtp.cli import main
from wmtp.evaluate.checkpoint_eval import flat_metrics
from wmtp.evaluate.generation import Sampling, generate_samples
from wmtp.execution.problems import Problem
from wmtp.model import MTPModel

MBPP = Path(__file__).resolve().parents[1] / "data" / "mbpp"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    overrides = {"config": {"datasets": {"mbpp": str(MBPP)}}}
    assert main(train_args(tmp, **overrides)) == 0
    config, recipe = files(tmp, **overrides)
    return config, recipe, tmp / "runs" / "run" / "final"


def eval_args(trained, out: Path, *extra: str) -> list[str]:
    config, recipe, checkpoint = trained
    return ["eval", "--config", str(config), "--recipe", str(recipe), "--checkpoint", str(checkpoint),
            "--benchmarks", "mbpp,humaneval", "--limit", "3", "--max-new-tokens", "12", "--out", str(out), *extra]


def test_without_the_opt_in_nothing_is_executed(trained, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(eval_args(trained, out, "--speculative-prompts", "0")) == 0
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 6  # 3 MBPP + 3 HumanEval problems, n = 1
    record = json.loads(lines[0])
    assert {"benchmark", "task_id", "sample", "prompt", "completion", "tests", "generation"} <= set(record)
    assert not (out / "executions.jsonl").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["passk"]["benchmarks"] == {} and "not executed" in results["passk"]["note"]
    assert "wmtp execute" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Head quality" in report and (out / "head_accuracy.png").is_file()
    assert [h["head"] for h in results["heads"]["heads"]] == [0, 1, 2]


def test_eval_with_execution_then_execute_and_report(trained, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(eval_args(trained, out, "--allow-code-execution", "--n", "2", "--temperature", "0.8",
                          "--k", "1,2,5", "--speculative-prompts", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    mbpp = results["passk"]["benchmarks"]["mbpp"]
    assert mbpp["problems"] == 3 and mbpp["n"] == 2
    assert mbpp["pass@k"]["pass@5"] is None  # k > n: missing, not invented
    assert 0.0 <= mbpp["pass@k"]["pass@1"]["mean"] <= 1.0
    assert results["passk"]["generation"]["temperature"] == 0.8 and results["passk"]["generation"]["n"] == 2
    assert len((out / "executions.jsonl").read_text().splitlines()) == 12
    assert results["speculative"]["prompts"] == 2 and results["speculative"]["mean_accepted_length"] >= 1.0
    assert "pass@5 missing" in capsys.readouterr().out
    metrics = flat_metrics(results)  # what goes to MLflow: names it accepts, missing values left out
    assert metrics["eval/mbpp/pass_at_1"] == mbpp["pass@k"]["pass@1"]["mean"] and "eval/mbpp/pass_at_5" not in metrics
    assert all(re.fullmatch(r"[\w\-. :/]+", name) for name in metrics)
    # the generations file alone is enough to score again
    again = tmp_path / "again"
    assert main(["execute", str(out / "generations.jsonl"), "--allow-code-execution", "--k", "1,2",
                 "--out", str(again)]) == 0
    rescored = json.loads((again / "results.json").read_text())["passk"]["benchmarks"]
    assert rescored["mbpp"]["per_problem"] == {t: {k: v for k, v in p.items() if k != "pass@5"}
                                               for t, p in mbpp["per_problem"].items()}
    # side by side
    report_dir = tmp_path / "report"
    assert main(["report", str(out), str(again), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    assert "| ev | mbpp | 3 | 2 |" in text and "| again | mbpp | 3 | 2 |" in text
    assert "| again | " in text.split("Head quality")[1] and "—" in text.split("Head quality")[1]


def test_execute_refuses_without_the_opt_in(tmp_path, capsys):
    path = tmp_path / "g.jsonl"
    path.write_text('{"benchmark": "humaneval", "task_id": "HumanEval/0", "completion": "    return True\\n"}\n')
    assert main(["execute", str(path)]) == 1
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["execute", str(path), "--allow-code-execution", "--k", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["passk"]["benchmarks"]["humaneval"]["pass@k"]["pass@1"]["mean"] == 0.0


def test_bad_checkpoint_and_benchmark_are_one_line_errors(trained, tmp_path, capsys):
    config, recipe, _ = trained
    assert main(["eval", "--config", str(config), "--recipe", str(recipe), "--checkpoint", str(tmp_path)]) == 1
    assert "not a wmtp model directory" in capsys.readouterr().err
    assert main(eval_args(trained, tmp_path / "x", "--benchmarks", "apps")) == 1
    assert "unknown apps" in capsys.readouterr().err


class CharTokenizer:
    """Characters as tokens (ids 3..), enough for generation tests."""
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 60) for c in text]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(ord("a") + (int(t) - 3) % 26) if int(t) >= 3 else "" for t in row) for row in rows]


def test_greedy_batched_generation_equals_one_by_one_hf_generate():
    torch.manual_seed(0)
    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    tok = CharTokenizer()
    problems = [Problem("humaneval", f"t{i}", "def f(x):\n" + "y" * i, {}, "") for i in range(5)]
    records = generate_samples(model, tok, problems, Sampling(max_new_tokens=8, batch_size=3),
                               device=torch.device("cpu"))
    for problem, record in zip(problems, records, strict=True):
        ids = torch.tensor([tok(problem.prompt)["input_ids"]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, pad_token_id=0, eos_token_id=2)
        assert record["completion"] == tok.batch_decode(alone[:, ids.shape[1]:])[0]


def test_sampling_is_seeded_and_greedy_needs_one_sample():
    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    problems = [Problem("humaneval", "t", "def f(x):\n", {}, "")]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=6, seed=3)
    a = generate_samples(model, CharTokenizer(), problems, sampling, device=torch.device("cpu"))
    b = generate_samples(model, CharTokenizer(), problems, sampling, device=torch.device("cpu"))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert len({r["completion"] for r in a}) > 1
    with pytest.raises(ValueError, match="greedy"):
        Sampling(n=2, temperature=0.0)
