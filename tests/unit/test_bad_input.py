"""Bad input, tried as a new user would: each gets a one-line error naming the file and the key (or the line), exit
code 1, and nothing half-done (no program run, no half-written file kept)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from helpers.tiny_run import files, train_args

from wmtp.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with a checkpoint at step 2 and one at the end (step 4)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    assert main(train_args(tmp, "run", config={"checkpoint": {"every_steps": 2, "keep_last": 3}})) == 0
    return tmp


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmtp: error:") and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- generations files
@pytest.mark.parametrize(("tests", "key"), [
    ('"assert f(1) == 1"', "`tests` must be an object"),
    ("{}", "`tests.test_list` is required for mbpp"),
    ('{"test_list": "assert f(1) == 1"}', "`tests.test_list` must be a list of str"),
    ('{"test_list": [1]}', "`tests.test_list` must be a list of str"),
])
def test_a_generations_record_of_the_wrong_shape_stops_before_anything_runs(tmp_path, capsys, monkeypatch, tests,
                                                                            key):
    ran = []
    monkeypatch.setattr("wmtp.execution.sandbox.Sandbox.run", lambda self, *a, **k: ran.append(a))
    path = tmp_path / "generations.jsonl"
    good = {"benchmark": "mbpp", "task_id": "1", "completion": "def f(x):\n    return x\n",
            "tests": {"test_list": ["assert f(1) == 1"]}}
    path.write_text(json.dumps(good) + "\n" + '{"benchmark": "mbpp", "task_id": "2", "completion": "x", "tests": '
                    + tests + "}\n")
    assert main(["execute", str(path), "--allow-code-execution", "--isolation", "none"]) == 1
    err = error_line(capsys)
    assert f"{path}:2" in err and key in err
    assert not ran and not (tmp_path / "executions.jsonl").exists()


@pytest.mark.parametrize(("benchmark", "tests", "key"), [
    ("humaneval", '{"test": "def check(c): pass"}', "`tests.entry_point` is required for humaneval"),
    ("codecontests", '{"input": ["1"], "output": []}', "`tests.input` has 1 cases, `tests.output` 0"),
    ("codecontests", '{"input": "1", "output": "1"}', "`tests.input` must be a list of str"),
])
def test_other_benchmarks_check_their_tests_shape(tmp_path, capsys, benchmark, tests, key):
    path = tmp_path / "g.jsonl"
    path.write_text(f'{{"benchmark": "{benchmark}", "task_id": "t", "prompt": "", "completion": "x", '
                    f'"tests": {tests}}}\n')
    assert main(["execute", str(path), "--allow-code-execution", "--isolation", "none"]) == 1
    err = error_line(capsys)
    assert f"{path}:1" in err and key in err


# ------------------------------------------------------------------------------------------- damaged files
def test_a_truncated_model_file_names_the_file_in_eval(trained, tmp_path, capsys):
    final = tmp_path / "final"
    import shutil

    shutil.copytree(trained / "runs" / "run" / "final", final)
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config, recipe = files(trained)
    assert main(["eval", "--config", str(config), "--recipe", str(recipe), "--checkpoint", str(final),
                 "--benchmarks", "", "--out", str(tmp_path / "eval")]) == 1
    err = error_line(capsys)
    assert str(final) in err and "damaged or incomplete" in err


def copy_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "runs" / "copy"
    shutil.copytree(trained / "runs" / "run", run)
    for name in ("snippets.jsonl",):
        shutil.copy(trained / name, tmp_path / name)
    return run


def test_a_truncated_checkpoint_shard_names_the_checkpoint_on_resume(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    state = run / "checkpoints" / "step-00000004" / "state"
    (shard,) = state.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main([*train_args(tmp_path, "copy"), "--resume", "auto"]) == 1
    err = error_line(capsys)
    assert str(state) in err and "damaged or incomplete" in err


def test_a_cut_trainer_state_names_the_file_on_resume(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    state = run / "checkpoints" / "step-00000004" / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    assert main([*train_args(tmp_path, "copy"), "--resume", "auto"]) == 1
    err = error_line(capsys)
    assert f"{state}: not valid JSON" in err


def test_output_dir_that_is_a_file_names_the_key(tmp_path, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    assert main(train_args(tmp_path, config={"output_dir": str(blocker)})) == 1
    err = error_line(capsys)
    assert "config.yaml: output_dir:" in err and "is a file, expected a directory" in err


# ------------------------------------------------------------------------------------------- leftovers
def test_what_a_killed_save_left_behind_is_removed_on_resume_and_on_save(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    leftovers = [run / "checkpoints" / ".step-00000006.x1y2", run / ".final.k3j4"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    args = train_args(tmp_path, "copy", recipe={"train": {"max_steps": 6}},
                      config={"checkpoint": {"every_steps": 2, "keep_last": 3}})
    assert main([*args, "--resume", "auto"]) == 0
    assert not any(p.exists() for p in leftovers)
    assert (run / "checkpoints" / "step-00000006").is_dir()


# ------------------------------------------------------------------------------------------- packaging and logs
def test_the_licence_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])


def test_without_progress_the_libraries_draw_no_bars(trained, tmp_path, capsys):
    """Saving (Writing model shards) and loading (Loading weights, on resume) stay quiet with progress: false."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: an earlier test may have silenced them
    enable_progress_bars()
    run = copy_run(trained, tmp_path)
    capsys.readouterr()
    args = train_args(tmp_path, "copy", recipe={"train": {"max_steps": 6}},
                      config={"checkpoint": {"every_steps": 2, "keep_last": 3}})
    assert main([*args, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert (run / "final").is_dir()
    assert "Writing model shards" not in err and "Loading weights" not in err, err
