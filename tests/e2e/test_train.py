import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny_run import files, final_weights, train_args
from helpers.torchrun import run_torchrun

from wmtp import MTPModel
from wmtp.cli import main
from wmtp.components.checkpoint import load_checkpoint_model

ROOT = Path(__file__).resolve().parents[2]


def test_training_lowers_validation_loss_and_writes_outputs(tmp_path, capsys):
    assert main(train_args(tmp_path, recipe={"train": {"max_steps": 30, "eval_every": 15}},
                           config={"mlflow": {"enabled": True}})) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "run"
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step-00000030").is_dir()
    assert "validation at step 30: loss" in out and "MLflow run" in out and (tmp_path / "runs" / "mlflow.db").is_file()
    line = next(x for x in out.splitlines() if x.startswith("validation at step"))
    final, initial = float(line.split()[5]), float(line.split("initial ")[1].rstrip(")"))
    assert final < initial - 1.0, line
    model = MTPModel.from_pretrained(run / "final")
    assert model.n_heads == 3


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    assert main([*train_args(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 heads" in out and "4 optimizer steps" in out and "one forward on one batch: loss" in out
    assert not (tmp_path / "runs").exists()


def test_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    config_path, recipe_path = files(tmp_path, recipe={"optim": {"lr": -1}})
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmtp: error:") and "optim.lr" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path), "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_resume_is_bit_identical(tmp_path):
    recipe = {"train": {"max_steps": 6, "grad_accum_steps": 2, "micro_batch_size": 2}}
    config = {"checkpoint": {"every_steps": 3, "keep_last": 5}}
    assert main(train_args(tmp_path, "full", recipe=recipe, config=config)) == 0
    full = tmp_path / "runs" / "full"
    # A second run continues from the full run's step-3 checkpoint, copied into a fresh run directory.
    import shutil

    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    config_path, recipe_path = files(tmp_path, recipe=recipe, config=config)
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path),
                 "--resume", str(resumed / "checkpoints" / "step-00000003")]) == 0
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and a run that restarted from scratch instead would differ (the checkpoint carries real state)
    start = load_checkpoint_model(full / "checkpoints" / "step-00000003").state_dict()
    assert not torch.equal(start["base.model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_existing_run_needs_resume_flag(tmp_path, capsys):
    args = train_args(tmp_path, "same", recipe={"train": {"max_steps": 1}})
    assert main(args) == 0
    assert main(args) == 1
    assert "--resume auto" in capsys.readouterr().err
    assert main([*args, "--resume", "auto"]) == 0  # already at max_steps: resumes, nothing left to do


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    args = train_args(tmp_path, "sig", recipe={"train": {"max_steps": 100000}})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "wmtp", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
        assert time.monotonic() < deadline, "training did not start"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    checkpoints = sorted((tmp_path / "runs" / "sig" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) >= 3
    load_checkpoint_model(checkpoints[0])
    assert not (tmp_path / "runs" / "sig" / "final").exists()
    assert not [p for p in checkpoints[0].parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes_equal_one_process(tmp_path, strategy, capsys):
    recipe_two = {"train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2}}
    recipe_one = {"train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 2}}
    config = {"compute": {"distributed": strategy}}
    assert main(train_args(tmp_path, "one", recipe=recipe_one, config=config)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "wmtp", *train_args(tmp_path, "two", recipe=recipe_two, config=config)]
    proc = run_torchrun(torchrun, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run ") == 1  # rank 0 alone reports

    def losses(text: str) -> list[float]:
        return [float(line.split(" loss ")[1].split()[0]) for line in text.splitlines() if line.startswith("step ")]

    # the logged loss is the global-normalised sum over both ranks: a wrong normaliser shows here (Adam's
    # update is scale-invariant, so the weights alone would not reveal a constant factor)
    one_losses, two_losses = losses(capsys.readouterr().err), losses(proc.stderr)
    assert len(one_losses) == len(two_losses) == 3
    assert one_losses == pytest.approx(two_losses, rel=1e-5)
    one, two = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "two")
    # Same global batch and normaliser; only the order of float sums differs (gloo all-reduce, thread count), and
    # Adam's m/sqrt(v) amplifies that slightly over 3 steps: ~1e-5 here, while a wrong normaliser or a missing
    # all-reduce moves weights by ~lr = 3e-3.
    for key in one:
        assert torch.allclose(one[key], two[key], atol=5e-5, rtol=1e-4), (key, (one[key] - two[key]).abs().max())


def test_early_stopping_without_validation_data_is_refused(tmp_path, capsys):
    args = train_args(tmp_path, recipe={"data": {"validation_fraction": 0.0},
                                        "train": {"eval_every": 1, "early_stopping": {"patience": 1}}})
    assert main(args) == 1
    assert "early_stopping needs validation data" in capsys.readouterr().err
