"""What a first-time user meets in the first hour of `wmtp train`: command-line overrides, heads that can never
have a target, what the dry run and a resume say, missing model paths, readable progress, names of the earlier
project. Each test failed on the code before it."""

import io
import json
import subprocess
import sys

import pytest
import torch
from helpers.tiny_run import files, train_args

from wmtp.cli import main
from wmtp.components.validate import quality_metrics
from wmtp.config import ConfigError, load_recipe, parse_overrides
from wmtp.runtime.tracking import METRICS_FILE, RUN_FILE, Progress


def records(run):
    return json.loads((run / RUN_FILE).read_text()), [json.loads(x) for x in (run / METRICS_FILE).open()]


# ------------------------------------------------------------------------------------------ overrides (item 7)
def test_set_overrides_apply_validate_and_are_recorded(tmp_path, capsys):
    args = [*train_args(tmp_path, config={"mlflow": {"enabled": True}}), "--set", "train.max_steps=2",
            "--set", "compute.seed=1", "--set", "config.checkpoint.keep_last=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    overrides = "--set compute.seed=1 --set config.checkpoint.keep_last=3 --set train.max_steps=2"  # config's first
    assert "at step 2/2" in out and f"overrides: {overrides}" in out
    run = tmp_path / "runs" / "run"
    record, metrics = records(run)
    params = record["params"]
    assert params["recipe.train.max_steps"] == "2" and params["config.compute.seed"] == "1"
    assert params["config.checkpoint.keep_last"] == "3"
    assert params["overrides"] == overrides
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]
    from mlflow.tracking import MlflowClient

    mlflow_run = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(record["mlflow_run_id"])
    assert mlflow_run.data.params["recipe.train.max_steps"] == "2"
    assert mlflow_run.data.tags["wmtp.overrides"] == overrides
    # the run directory keeps the resolved inputs, overrides applied (what `wmtp eval` of a checkpoint reads)
    assert load_recipe(run / "recipe.yaml").train.max_steps == 2


@pytest.mark.parametrize("item, expected", [
    ("train.max_stepz=3", "--set train.max_stepz=3: train.max_stepz: unknown key"),
    ("train.max_steps=-1", "--set train.max_steps=-1: train.max_steps: Input should be greater than or equal to 1"),
    ("train.max_steps", "--set train.max_steps: expected key=value"),
    ("compute.seed=[1", "--set compute.seed=[1: the value is not valid YAML"),
    ("data.train.5.limit=3", "--set data.train.5.limit=3: data.train is a list of 1: expected an index 0-0"),
    ("rho1.temperature=2", "--set rho1.temperature=2: rho1: the `rho1` section goes with algorithm: rho1"),
])
def test_bad_overrides_are_one_line_errors_naming_the_flag(tmp_path, capsys, item, expected):
    assert main([*train_args(tmp_path), "--set", item, "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_overrides_go_to_the_file_that_owns_the_key():
    config, recipe, texts = parse_overrides(["compute.seed=1", "output_dir=x", "train.max_steps=10", "rho1.k=0.5",
                                             "recipe.optim.lr=1e-4", "config.logging.log_every=5"])
    assert config == {"compute.seed": 1, "output_dir": "x", "logging.log_every": 5}
    assert recipe == {"train.max_steps": 10, "rho1.k": 0.5, "optim.lr": "1e-4"}  # YAML's reading, as in a file
    assert texts["optim.lr"] == "recipe.optim.lr=1e-4"
    with pytest.raises(ConfigError, match="set twice"):
        parse_overrides(["train.max_steps=1", "recipe.train.max_steps=2"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("wmtp 0.")


# ----------------------------------------------------------------- heads that never get a target (item 3)
def test_heads_without_any_target_are_a_set_up_error(tmp_path, capsys):
    args = train_args(tmp_path, recipe={"mtp": {"n_heads": 12}, "data": {"max_length": 8}})
    assert main([*args, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "mtp.n_heads: 12 heads need data.max_length >= 13 (got 8)" in err and "heads 7-11" in err


def test_heads_without_a_target_in_the_data_are_a_set_up_error(tmp_path, capsys):
    # every document is shorter than head 9's distance: the static check passes, the data check does not
    short = [{"text": f"x = {i}\n"} for i in range(40)]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    args = train_args(tmp_path, config={"datasets": {"snippets": str(tmp_path / "short.jsonl")}},
                      recipe={"mtp": {"n_heads": 10}, "data": {"packing": False}})
    assert main([*args, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "mtp.n_heads: heads" in err and "have no target in the training sequences" in err and "packing off" in err


def test_a_head_without_pairs_reports_no_metric_not_zero():
    report = {"loss": 2.0, "heads": [{"head": 0, "ce": 2.0, "ppl": 7.39, "acc": 0.5, "pairs": 4},
                                     {"head": 1, "ce": None, "ppl": None, "acc": None, "pairs": 0}]}
    metrics = quality_metrics(report)
    assert metrics == {"val/loss": 2.0, "val/ce_head0": 2.0, "val/ppl_head0": 7.39, "val/acc_head0": 0.5}
    assert quality_metrics({"loss": None, "heads": []}) == {}


def test_step_metrics_omit_a_head_without_pairs():
    from wmtp.training.totals import StepTotals

    totals = StepTotals.zeros(2, torch.device("cpu"))
    totals.ce += torch.tensor([3.0, 0.0], dtype=torch.float64)
    totals.head_pairs += torch.tensor([2.0, 0.0], dtype=torch.float64)
    metrics = totals.metrics()
    assert metrics["train/ce_head0"] == 1.5 and "train/ce_head1" not in metrics and "train/acc_head1" not in metrics


# ------------------------------------------------------------------- what the dry run and a resume say (item 4)
def test_dry_run_refuses_a_run_name_in_use_as_the_run_would(tmp_path, capsys):
    args = train_args(tmp_path, "same", recipe={"train": {"max_steps": 1}})
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 1
    assert "already holds a run: pass --resume auto" in capsys.readouterr().err


def test_every_start_says_where_it_starts(tmp_path, capsys):
    args = [*train_args(tmp_path, "typo", recipe={"train": {"max_steps": 2}}), "--resume", "auto"]
    assert main([*args, "--dry-run"]) == 0
    assert "no checkpoint of" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint of {tmp_path / 'runs' / 'typo'} found: starting at step 0" in out
    assert main([*args, "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'runs' / 'typo' / 'checkpoints' / 'step-00000002'} (step 2)" in out
    assert "at step 3/3" in out
    _, metrics = records(tmp_path / "runs" / "typo")
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]


def test_a_stop_on_request_is_recorded_as_stopped_not_killed(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from wmtp.training.trainer import Trainer

    original = Trainer.train_step

    def step_then_signal(self):
        metrics = original(self)
        if self.step == 1:  # the second step is running: SIGTERM arrives now
            self.stop_signal = "SIGTERM"
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    args = train_args(tmp_path, "stop", recipe={"train": {"max_steps": 5, "eval_every": 1}},
                      config={"mlflow": {"enabled": True}})
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stopped at step 2/5 (stopped by SIGTERM after step 2; --resume auto continues" in out
    assert "validation at step 2: loss" in out
    record, _ = records(tmp_path / "runs" / "stop")
    assert record["status"] == "STOPPED"
    run = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["wmtp.status"] == "STOPPED"
    assert run.data.tags["wmtp.step"] == "2"


# ------------------------------------------------------------------------------- a missing model path (item 9)
@pytest.mark.parametrize("section, key", [("model", "model.path"), ("reference_model", "reference_model.path")])
def test_a_missing_model_path_is_named(tmp_path, capsys, section, key):
    missing = str(tmp_path / "runs" / "demo-reference" / "final")
    if section == "model":
        config = {"model": {"path": missing, "from_scratch": None, "train_tokenizer": None}}
        recipe = {}
    else:
        config = {"reference_model": {"path": missing}}
        recipe = {"algorithm": "rho1", "rho1": {"mode": "weighted"}}
    config_path, recipe_path = files(tmp_path, config=config, recipe=recipe)
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"wmtp: error: {key}: {missing} does not exist (expected a directory, a GGUF file, " \
                  "pkg:<package>/<file>, a storage URL, or a hub id such as org/name)"


def test_hub_ids_are_told_from_paths():
    from wmtp.model.build import looks_like_hub_id

    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and looks_like_hub_id("gpt2")
    for path in ("runs/demo-reference/final", "./model", "/abs/model", "~/m", "model.gguf", "a/../b", "a--b/c"):
        assert not looks_like_hub_id(path), path


# --------------------------------------------------------------------------------- progress (item 10)
def test_a_real_run_prints_the_plan_before_step_one(tmp_path, capsys):
    assert main(train_args(tmp_path, recipe={"train": {"max_steps": 2}})) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for prefix in ("model:", "data:", "steps: 2 optimizer steps", "weighting:", "device:", "outputs:"):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert "step 1/2 loss" in captured.err and "the first step includes allocation and warm-up; the ETA leaves it out" \
        in captured.err


def test_progress_to_a_file_is_plain_lines_and_the_eta_leaves_out_the_first_step(monkeypatch):
    stream = io.StringIO()
    clock = iter([0.0, 30.0, 31.0, 32.0, 33.0])
    monkeypatch.setattr("wmtp.runtime.tracking.time.monotonic", lambda: next(clock))
    progress = Progress(10, 0, enabled=True, active=True, every=1, stream=stream)
    for step in (1, 2, 3, 4):
        progress.update(step, {"train/loss": 1.0, "train/lr": 1e-3}, logged=True)
    text = stream.getvalue()
    assert "\r" not in text and text.startswith("step 1/10 loss 1.0000 lr 1.00e-03 (took 30.0s: the first step")
    # three steps after the first took 1 s each: 6 steps left at 1 s, not at the 8 s mean that counts step 1
    assert text.splitlines()[-1] == "step 4/10 loss 1.0000 lr 1.00e-03 eta 6s"


def test_progress_to_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    progress = Progress(10, 0, enabled=True, active=True, stream=Terminal())
    assert progress.bar is not None
    progress.close()


def test_progress_in_a_log_file_from_the_command_line(tmp_path):
    config_path, recipe_path = files(tmp_path, config={"logging": {"progress": True, "log_every": 2}},
                                     recipe={"train": {"max_steps": 4}})
    proc = subprocess.run([sys.executable, "-m", "wmtp", "train", "--config", str(config_path), "--recipe",
                           str(recipe_path), "--run-name", "log"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "step 2/4 loss" in proc.stderr and "step 4/4 loss" in proc.stderr


# ------------------------------------------------------------------- names of the earlier project (item 11)
@pytest.mark.parametrize("old, new", [("rho1-weighted", "algorithm: rho1 with rho1.mode: weighted"),
                                      ("rho1-tokenskip", "algorithm: rho1 with rho1.mode: token_skip"),
                                      ("critic-wmtp", "algorithm: critic")])
def test_earlier_algorithm_names_say_what_they_are_now(tmp_path, capsys, old, new):
    assert main([*train_args(tmp_path, recipe={"algorithm": old}), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"algorithm: `{old}` is the earlier project's name; it is now `{new}`" in err


def test_a_missing_recipe_lists_the_recipes_that_exist(tmp_path, capsys):
    config_path, recipe_path = files(tmp_path)
    (tmp_path / "rho1.yaml").write_text(recipe_path.read_text())
    assert main(["train", "--config", str(config_path), "--recipe", str(tmp_path / "recipe.rho1.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert "recipe.rho1.yaml: file not found (recipe files are named <name>.yaml now:" in err
    assert f"recipes in {tmp_path}: recipe.yaml, rho1.yaml" in err and len(err.splitlines()) == 1
