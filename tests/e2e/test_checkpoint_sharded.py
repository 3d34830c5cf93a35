"""Sharded checkpoints (torch.distributed.checkpoint) and the final model's sharded safetensors: resume at another
world size, an interrupted save that is never picked up, and a final directory Hugging Face loads as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_gpt2, tiny_llama
from helpers.tiny_run import final_weights, train_args
from helpers.torchrun import run_torchrun
from safetensors.torch import load_file

from wmtp.cli import main
from wmtp.components.checkpoint import list_checkpoints
from wmtp.components.checkpointer import find_resume
from wmtp.model.mtp import WEIGHTS_INDEX, MTPModel

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               "-m", "wmtp", *args]
    return run_torchrun(command, env=ENV)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # Same global batch, normaliser and data order; only the order of float sums differs between one process
    # and two (gloo all-reduce, sharded gradient reduction), which Adam's m/sqrt(v) amplifies slightly over the
    # steps: ~1e-5 here, while a lost optimizer state or a wrong data position moves weights by ~lr = 3e-3.
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=5e-5, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


# World size 2 with micro-batches of 2 and world size 1 with micro-batches of 4 take the same global batches.
TWO_STEPS = {"train": {"max_steps": 4, "micro_batch_size": 2}}
ONE_STEPS = {"train": {"max_steps": 4, "micro_batch_size": 4}}
TWO, ONE = TWO_STEPS, ONE_STEPS
SAVE = {"checkpoint": {"every_steps": 2, "keep_last": 5, "max_shard_size": "20KB"},
        "compute": {"distributed": "fsdp2"}}


def continue_from(tmp_path: Path, source: Path, name: str) -> Path:
    """A fresh run directory holding `source`'s step-2 checkpoint."""
    run = tmp_path / "runs" / name
    shutil.copytree(source / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000002")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_resume_at_another_world_size_continues_the_run(tmp_path, head_type):
    """FSDP2 on 2 ranks -> 1 process, and 1 process -> FSDP2 on 2 ranks: each continued run ends where the
    uninterrupted one does (sequential depths: each its own FSDP2 unit, scaled before step 1 on rank 0 alone)."""
    ONE = {**ONE_STEPS, "mtp": {"head_type": head_type}}  # noqa: N806 (the module's names, per head type)
    TWO = {**TWO_STEPS, "mtp": {"head_type": head_type}}  # noqa: N806
    assert main(train_args(tmp_path, "one", recipe=ONE, config=SAVE)) == 0
    proc = torchrun(train_args(tmp_path, "two", recipe=TWO, config=SAVE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    # each rank wrote its own shard of the sharded state
    assert len(list((two / "checkpoints" / "step-00000002" / "state").glob("*.distcp"))) == 2
    assert_close(final_weights(one), final_weights(two))
    # the final model of the sharded run was written in several files, gathered one tensor at a time
    assert (two / "final" / WEIGHTS_INDEX).is_file() and len(list((two / "final").glob("model-*.safetensors"))) > 2

    down = continue_from(tmp_path, two, "two-then-one")  # saved by 2 ranks, resumed by 1
    assert main([*train_args(tmp_path, "two-then-one", recipe=ONE, config=SAVE), "--resume", "auto"]) == 0
    up = continue_from(tmp_path, one, "one-then-two")  # saved by 1 process, resumed by 2 ranks
    proc = torchrun([*train_args(tmp_path, "one-then-two", recipe=TWO, config=SAVE), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(final_weights(down), final_weights(two))
    assert_close(final_weights(up), final_weights(one))


KILLER = textwrap.dedent("""
    import os, sys
    import wmtp.components.checkpoint as checkpoint

    original, saves = checkpoint.dcp.save, []

    def save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2 and os.environ["RANK"] == "1":
            os._exit(9)  # rank 1 dies in the middle of the second checkpoint
        return original(*args, **kwargs)

    checkpoint.dcp.save = save
    from wmtp.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_save_killed_on_one_rank_is_never_picked_up(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER)
    args = train_args(tmp_path, "killed", recipe=TWO, config={**SAVE, "compute": {"distributed": "fsdp2",
                                                                                     "timeout_minutes": 1}})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(driver), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode != 0
    run = tmp_path / "runs" / "killed"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert (run / "checkpoints" / ".step-00000004.partial").is_dir()  # the interrupted one, hidden
    assert find_resume("auto", run) == run / "checkpoints" / "step-00000002"
    assert not (run / "checkpoints" / ".step-00000004.partial").exists()
    assert main([*train_args(tmp_path, "killed", recipe=ONE, config=SAVE), "--resume", "auto"]) == 0
    assert (run / "final" / WEIGHTS_INDEX).is_file()


@pytest.mark.parametrize("make", [lambda: tiny_llama(tie=True), lambda: tiny_llama(tie=False), tiny_gpt2])
def test_the_final_model_is_sharded_as_hugging_face_writes_it(tmp_path, make):
    from transformers import AutoModelForCausalLM

    model = MTPModel.from_base(make(), n_heads=3, head_type="transformer")
    model.save_pretrained(tmp_path / "m", max_shard_size=20_000)
    shards = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "m" / WEIGHTS_INDEX).is_file()
    assert all(p.stat().st_size < 20_000 + 16_384 or len(load_file(p)) == 1 for p in shards)
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in model.base.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    again = MTPModel.from_pretrained(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    model.save_pretrained(tmp_path / "one")  # default 5GB: one file, no index
    assert (tmp_path / "one" / "model.safetensors").is_file() and not (tmp_path / "one" / WEIGHTS_INDEX).exists()
