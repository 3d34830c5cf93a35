"""`wmtp eval`, `wmtp execute` and `wmtp report` end to end on a tiny trained model; generation details."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_llama
from helpers.tiny_run import files, train_args
from helpers.torchrun import run_torchrun

from wmtp.cli import main
from wmtp.config import ConfigError
from wmtp.evaluate.checkpoint_eval import flat_metrics
from wmtp.evaluate.generation import (
    Sampling,
    StopAfterCodeBlock,
    StopOnSequences,
    generate_samples,
    make_batches,
)
from wmtp.execution.problems import STOP, Problem, chat_message, code_block_closed, completion_from_reply
from wmtp.model.mtp import MTPModel

MBPP = Path(__file__).resolve().parents[2] / "data" / "mbpp"


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
    # labelled by their training run's name (the rescoring knows it from the evaluation beside its file), kept apart
    assert "| run/ev | mbpp | 3 | 2 |" in text and "| run/again | mbpp | 3 | 2 |" in text
    assert "| run/again | " in text.split("Head quality")[1] and "—" in text.split("Head quality")[1]
    # the same samples scored twice: no difference on any problem
    assert "## Paired differences against run/ev" in text
    assert "| run/again | mbpp | 1 | 3 | +0.0 [+0.0, +0.0] | 0 | 0 |" in text


def test_checkpoint_is_evaluated_in_the_config_model_dtype(trained, tmp_path):
    """--checkpoint loads the saved model in config model.dtype (as training loaded its base model): a float32
    checkpoint evaluated with model.dtype bfloat16 runs in bfloat16."""
    import yaml

    config, recipe, final = trained
    settings = yaml.safe_load(config.read_text())
    settings["model"]["dtype"] = "bfloat16"
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(yaml.safe_dump(settings))
    out = tmp_path / "ev"
    assert main(["eval", "--config", str(bf16), "--recipe", str(recipe), "--checkpoint", str(final),
                 "--benchmarks", "humaneval", "--limit", "1", "--max-new-tokens", "4", "--no-heads",
                 "--speculative-prompts", "0", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((final / "config.json").read_text()).get("dtype", "float32") == "float32"


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


def test_incremental_stop_check_agrees_with_decoding_the_whole_continuation(trained):
    """Step by step over random continuations made of the trained BPE tokenizer's tokens (biased towards those
    holding newlines and stop fragments), the windowed check fires in the same step as `stop in decode(all)`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained[2]))
    vocab = list(range(len(tok)))
    stops = [STOP["humaneval"], STOP["mbpp"], ["\n    return", "é\n"], []]
    pieces = ["\n", "def", " ", "class", "#", "é", "\n    return", "assert", "print(", "x",
              *(stop for row in stops for stop in row)]
    hinted = [tok(piece, add_special_tokens=False)["input_ids"] for piece in pieces]
    rng = random.Random(0)
    fired = 0

    def continuation() -> list[int]:
        ids: list[int] = []
        while len(ids) < 30:
            ids += rng.choice(hinted) if rng.random() < 0.3 else [rng.choice(vocab)]
        return ids[:30]

    for _ in range(40):
        prompt = [rng.choice(vocab) for _ in range(rng.randint(1, 6))]
        rows = [prompt + continuation() for _ in stops]
        check = StopOnSequences(tok, len(prompt), stops)
        for t in range(len(prompt) + 1, len(rows[0]) + 1):
            got = check(torch.tensor([r[:t] for r in rows]), None).tolist()
            texts = tok.batch_decode([r[len(prompt):t] for r in rows], skip_special_tokens=True)
            assert got == [any(s in text for s in row_stops) for text, row_stops in zip(texts, stops, strict=True)]
        fired += sum(got)
    assert fired > 20  # the stop sequences did occur (the check is not vacuously "never")


def test_code_block_stop_agrees_with_decoding_the_whole_reply(trained):
    """Step by step over random replies made of the trained BPE tokenizer's tokens (biased towards fences and
    newlines), the line-by-line check fires in the same step as `code_block_closed(decode(reply))`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained[2]))
    vocab = list(range(len(tok)))
    pieces = ["```", "```python\n", "\n```", "\n```\n", "`", "``", "\n", "x = 1", " ", "é", "def", "\n    "]
    hinted = [tok(piece, add_special_tokens=False)["input_ids"] for piece in pieces]
    rng = random.Random(1)
    fired = advanced = 0
    for _ in range(60):
        prompt = [rng.choice(vocab) for _ in range(rng.randint(1, 6))]
        rows = []
        for _ in range(4):
            ids: list[int] = []
            while len(ids) < 30:
                ids += rng.choice(hinted) if rng.random() < 0.4 else [rng.choice(vocab)]
            rows.append(prompt + ids[:30])
        check = StopAfterCodeBlock(tok, len(prompt), len(rows))
        for t in range(len(prompt) + 1, len(rows[0]) + 1):
            got = check(torch.tensor([r[:t] for r in rows]), None).tolist()
            texts = tok.batch_decode([r[len(prompt):t] for r in rows], skip_special_tokens=True)
            assert got == [code_block_closed(text) for text in texts]
        fired += sum(got)
        advanced += sum(anchor > len(prompt) for anchor in check.anchor)
    assert 20 < fired < 230  # blocks did close, and not in every reply
    assert advanced > 60  # completed lines were put aside: later calls decode only the current line


def chat_tokenizer(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained[2]))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def test_chat_prompts_generate_from_the_template_and_keep_the_reply(trained):
    """--prompt-format chat: the model continues the chat-formatted prompt (as a plain generate call on the same
    text does), the record keeps the reply and its completion is the reply's code; no template is an error."""
    model = MTPModel.from_pretrained(trained[2]).eval()
    tok = chat_tokenizer(trained)
    problems = [Problem("humaneval", f"t{i}", f'def f{i}(x):\n    """Add {i}."""\n', {}, "") for i in range(3)]
    records = generate_samples(model, tok, problems, Sampling(max_new_tokens=10, batch_size=1, prompt_format="chat"),
                               device=torch.device("cpu"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for problem, record in zip(problems, records, strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": chat_message(problem.prompt)}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.startswith("<user>Complete the following Python code.") and text.endswith("```\n<assistant>")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                               do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        reply = tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
        assert record["reply"] == reply and record["completion"] == completion_from_reply(reply)
        assert record["prompt"] == problem.prompt and record["generation"]["prompt_format"] == "chat"
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        generate_samples(model, tok, problems, Sampling(prompt_format="chat"), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="prompt format"):
        Sampling(prompt_format="json")


def torchrun_eval(trained, out: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               "-m", "wmtp", *eval_args(trained, out, "--no-heads", "--speculative-prompts", "0", "--samples", "2",
                                        "--temperature", "0.8", "--batch-size", "4")[:]]
    return run_torchrun(command, env=env)


def test_data_parallel_eval_under_torchrun_writes_what_one_process_writes(trained, tmp_path):
    """Two ranks take alternate batches of the same partition, each batch seeded by its index: the merged
    generations file is byte for byte the one-process file (sampled, so the seeds matter too)."""
    one = torchrun_eval(trained, tmp_path / "one", 1)
    two = torchrun_eval(trained, tmp_path / "two", 2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    lines = (tmp_path / "one" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and (tmp_path / "two" / "generations.jsonl").read_text().splitlines() == lines
    assert two.stdout.count("generation:") == 1 and "2 process(es)" in two.stdout  # rank 0 alone reports
    generation = json.loads((tmp_path / "two" / "results.json").read_text())["passk"]["generation"]
    assert generation["processes"] == 2 and generation["batches"] == 3 and generation["generated_tokens"] > 0


def test_eval_without_checkpoint_evaluates_the_config_model_as_is(trained, tmp_path, capsys):
    """A plain causal LM (no wmtp heads) in model.path: evaluated unmodified, head 0 only, under output_dir."""
    import yaml

    config, recipe, final = trained
    plain = tmp_path / "plain"
    model = MTPModel.from_pretrained(final)
    model.base.save_pretrained(plain)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(final)).save_pretrained(plain)
    settings = yaml.safe_load(config.read_text())
    settings["model"] = {"path": str(plain)}
    settings["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    assert main(["eval", "--config", str(tmp_path / "config.yaml"), "--recipe", str(recipe), "--benchmarks",
                 "humaneval", "--limit", "2", "--max-new-tokens", "6"]) == 0
    (out,) = (tmp_path / "runs").glob("eval-base-*")
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == f"{plain} (as is)"
    assert [h["head"] for h in results["heads"]["heads"]] == [0] and "speculative" not in results
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2


def test_batches_are_sorted_capped_and_never_more_than_half_padding():
    lengths = [300, 3707, 290, 855, 12, 757, 280, 5, 6, 300]
    batches = make_batches(lengths, batch_size=3)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    assert batches[0] == [1]  # the giant prompt alone
    for batch in batches:
        assert len(batch) <= 3 and all(2 * lengths[j] >= lengths[batch[0]] for j in batch)
        assert [lengths[j] for j in batch] == sorted((lengths[j] for j in batch), reverse=True)
    assert make_batches([10] * 7, batch_size=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_report_names_stay_distinct():
    """An eval-* directory is named after its training run; evaluations that would share a name (two eval-*
    directories in one output directory) each get their own directory's name."""
    from wmtp.evaluate.checkpoint_eval import report_names

    assert report_names([Path("runs/a/eval-1"), Path("runs/b/eval-2"), Path("x/mine")]) == ["a", "b", "mine"]
    assert report_names([Path("runs/eval-base-1"), Path("runs/eval-full"), Path("runs/b/eval-3")]) == [
        "runs/eval-base-1", "runs/eval-full", "b"]
