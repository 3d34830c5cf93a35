"""The trunk-state cache (`wmtp cache-states`, config `trunk_cache`): heads trained from the frozen trunk's cached
states see what they see through the trunk; the cache file's format, fingerprint and refusals."""

from pathlib import Path

import pytest
import torch
from helpers.models import batch, grads_of, perturb_heads, tiny_gpt2, tiny_llama

from wmtp.config import ConfigError, load_config
from wmtp.loss import mtp_labels
from wmtp.model.mtp import MTPLoss, MTPModel


def frozen_heads_model(base, head_type: str) -> MTPModel:
    model = MTPModel.from_base(base, n_heads=3, head_type=head_type).set_trainable("heads")
    perturb_heads(model)
    return model


@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_heads_from_trunk_states_equal_heads_through_the_trunk(head_type, make_base):
    """Loss, per-pair CE and every head gradient from the cached states equal those of a trunk forward; the trunk's
    states are taken once, outside any gradient, as the cache command takes them."""
    model = frozen_heads_model(make_base(), head_type)
    x, mask = batch()
    labels = mtp_labels(x, 3, attention_mask=mask)
    through = model(x, mask, MTPLoss(labels, chunk_size=7))
    through.loss.backward()
    reference = grads_of(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        states = model.trunk_states(x, mask)
    cached = model(x, mask, MTPLoss(labels, chunk_size=7), trunk=states)
    cached.loss.backward()
    got = grads_of(model)
    assert set(got) == set(reference) and all(k.startswith("heads.") for k in got)
    assert torch.allclose(cached.loss, through.loss, atol=1e-6)
    assert torch.allclose(cached.ce, through.ce, atol=1e-5)
    for name, grad in reference.items():
        assert torch.allclose(got[name], grad, atol=1e-6), name
    assert torch.equal(cached.trunk_hidden, through.trunk_hidden)


def test_last_layer_arguments_are_those_the_trunk_gives_its_last_layer():
    """The recomputed mask and rotary embeddings equal what the last layer gets in a real trunk forward, with
    padding (the mask differs per row) and the layers restored afterwards."""
    model = frozen_heads_model(tiny_llama(), "transformer")
    x, mask = batch()
    layers = model.base.base_model.layers
    seen = {}
    handle = layers[-1].register_forward_pre_hook(lambda _m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    model.base.base_model(input_ids=x, attention_mask=mask, use_cache=False)
    handle.remove()
    args, kwargs = model.last_layer_arguments(x, mask)
    assert model.base.base_model.layers is layers and len(layers) == 3
    assert args == seen["args"][1:]
    for key in ("attention_mask", "position_ids"):
        want, got = seen["kwargs"][key], kwargs[key]
        assert (want is None and got is None) or torch.equal(got, want), key
    for got, want in zip(kwargs["position_embeddings"], seen["kwargs"]["position_embeddings"], strict=True):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------- runs from the cache
def run_files(tmp_path, head_type="transformer", recipe=None, config=None):
    from helpers.tiny_run import files

    return files(tmp_path, config=config, recipe={"mtp": {"n_heads": 3, "head_type": head_type, "trainable": "heads"},
                                                  "train": {"max_steps": 3, "eval_every": 2, "micro_batch_size": 4,
                                                            "grad_accum_steps": 2}, **(recipe or {})})


def write_cache(tmp_path, config_path, recipe_path) -> Path:
    from wmtp.cli import main

    out = tmp_path / "states.safetensors"
    assert main(["cache-states", "--config", str(config_path), "--recipe", str(recipe_path), "--out", str(out)]) == 0
    return out


def train(config_path, recipe_path, run_dir, trunk_cache=None, count_trunk=False):
    """Train to the end; (the heads' parameters, every logged metric but the timings, trunk forwards per step)."""
    from wmtp.config import load_config, load_recipe
    from wmtp.runtime.distributed import DistInfo
    from wmtp.training.build import prepare
    from wmtp.training.trainer import Trainer

    config = load_config(config_path)
    if trunk_cache is not None:
        config = config.model_copy(update={"trunk_cache": str(trunk_cache)})
    setup = prepare(config, load_recipe(recipe_path), DistInfo(0, 1, 0, torch.device("cpu")))
    trainer = Trainer(setup, run_dir, run_name=run_dir.name)
    calls = []
    trainer.model.base.base_model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    logged = []
    original = trainer.tracker.log_metrics
    trainer.tracker.log_metrics = lambda metrics, step: (logged.append((step, dict(metrics))),
                                                         original(metrics, step))
    trainer.run()
    heads = {k: v.detach().clone() for k, v in trainer.model.heads.state_dict().items()}
    metrics = [(step, {k: v for k, v in m.items() if not k.startswith(("train/tokens_per_s", "train/model_tflops"))})
               for step, m in logged]
    return heads, metrics, len(calls)


def assert_same_training(a, b):
    heads_a, metrics_a, _ = a
    heads_b, metrics_b, _ = b
    for name, value in heads_a.items():
        assert torch.allclose(heads_b[name].float(), value.float(), atol=1e-5, rtol=1e-4), name
    assert [step for step, _ in metrics_a] == [step for step, _ in metrics_b]
    for (step, ma), (_, mb) in zip(metrics_a, metrics_b, strict=True):
        assert set(ma) == set(mb), step
        for key, value in ma.items():
            assert mb[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)


CASES = {
    "transformer": ("transformer", {}),
    "linear": ("linear", {}),
    "sequential": ("sequential", {}),
    "dpace": ("transformer", {"algorithm": "dpace"}),
    "gradnorm-separate-pass": ("transformer", {"algorithm": "gradnorm", "gradnorm": {"scoring": "separate_pass"}}),
    "rho1-in-forward": ("linear", {"algorithm": "rho1", "rho1": {"scoring": "in_forward"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_from_the_cache_equals_training_through_the_frozen_trunk(tmp_path, case):
    """The key check: the same seed, N steps from the cache and N steps through the frozen trunk give the same
    heads and the same logged metrics (train loss and per-head CE, weights, validation), and the run from the cache
    runs no trunk layer in training or validation (the trunk forwards of the other run show the hook counts)."""
    head_type, recipe = CASES[case]
    config_path, recipe_path = run_files(tmp_path, head_type, recipe)
    if recipe.get("algorithm") == "rho1":  # a saved reference that reads the run's own (trained) tokenizer
        from wmtp.config import load_config, load_recipe
        from wmtp.training.build import load_run_data

        reference = tmp_path / "reference"
        tiny_llama(5, vocab=512).save_pretrained(reference)
        load_run_data(load_config(config_path), load_recipe(recipe_path)).tokenizer.save_pretrained(reference)
        config_path, recipe_path = run_files(tmp_path, head_type, recipe,
                                             {"reference_model": {"path": str(reference)}})
    cache = write_cache(tmp_path, config_path, recipe_path)
    through = train(config_path, recipe_path, tmp_path / "runs" / "through")
    cached = train(config_path, recipe_path, tmp_path / "runs" / "cached", trunk_cache=cache)
    assert through[2] > 0 and cached[2] == 0
    assert_same_training(through, cached)


def test_a_resumed_run_from_the_cache_reads_the_rows_of_its_steps(tmp_path):
    """A run from the cache resumed from its step-2 checkpoint ends where the uninterrupted run through the trunk
    ends: the steps after the resume read the rows the plan gives them."""
    from wmtp.cli import main

    config_path, recipe_path = run_files(tmp_path, recipe={"train": {"max_steps": 4, "eval_every": 2,
                                                                     "micro_batch_size": 4, "grad_accum_steps": 2}},
                                         config={"checkpoint": {"every_steps": 2, "keep_last": 3}})
    cache = write_cache(tmp_path, config_path, recipe_path)
    through = train(config_path, recipe_path, tmp_path / "runs" / "through")
    common = ["--config", str(config_path), "--recipe", str(recipe_path), "--run-name", "resumed",
              "--set", f"trunk_cache={cache}"]
    assert main(["train", *common]) == 0
    checkpoint = tmp_path / "runs" / "resumed" / "checkpoints" / "step-00000002"
    assert checkpoint.is_dir()
    assert main(["train", *common, "--resume", str(checkpoint)]) == 0
    from helpers.tiny_run import final_weights

    resumed = final_weights(tmp_path / "runs" / "resumed")
    for name, value in through[0].items():
        assert torch.allclose(resumed[f"heads.{name}"], value, atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_two_ddp_ranks_reading_their_rows_equal_one_process_through_the_trunk(tmp_path):
    """Two gloo ranks (2 rows each) read their own rows of the cache and end where one process (4 rows) ends when
    it runs the trunk."""
    import os
    import sys

    from helpers.tiny_run import final_weights, train_args
    from helpers.torchrun import run_torchrun

    from wmtp.cli import main

    recipe = {"mtp": {"n_heads": 3, "trainable": "heads"}, "train": {"max_steps": 3, "micro_batch_size": 4}}
    one_args = train_args(tmp_path, "one", recipe=recipe)
    assert main(one_args) == 0
    cache = write_cache(tmp_path, Path(one_args[2]), Path(one_args[4]))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    args = train_args(tmp_path, "two", recipe={**recipe, "train": {"max_steps": 3, "micro_batch_size": 2}},
                      config={"trunk_cache": str(cache)})
    proc = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                         "-m", "wmtp", *args], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=5e-5, rtol=1e-4, msg=key)


# ----------------------------------------------------------------------------------- the file and refusals
def prepared(config_path, recipe_path, **config_updates):
    from wmtp.config import load_config, load_recipe
    from wmtp.runtime.distributed import DistInfo
    from wmtp.training.build import prepare

    config = load_config(config_path).model_copy(update=config_updates)
    return prepare(config, load_recipe(recipe_path), DistInfo(0, 1, 0, torch.device("cpu")))


def test_the_cache_is_a_safetensors_file_of_the_trunk_states_in_the_model_dtype(tmp_path):
    """Any safetensors reader reads the file: per split and state [N, S, D] in the model's dtype (bfloat16 here),
    equal to a trunk forward of those rows; the memory-mapped read gives the same rows in any order."""
    from safetensors import safe_open

    config_path, recipe_path = run_files(tmp_path, config={"model": {"dtype": "bfloat16"}})
    cache = write_cache(tmp_path, config_path, recipe_path)
    setup = prepared(config_path, recipe_path, trunk_cache=str(cache))
    with safe_open(str(cache), framework="pt") as handle:
        assert set(handle.keys()) == {"train.final", "train.z", "validation.final", "validation.z"}
        assert handle.metadata()["head_type"] == "transformer" and handle.metadata()["dtype"] == "bfloat16"
        z = handle.get_tensor("train.z")
    assert z.dtype == torch.bfloat16 and z.shape == (len(setup.train_set), 32, 32)
    rows = torch.tensor([5, 0, 3])
    batch = setup.train_set.select(rows)
    with torch.no_grad():
        want = setup.model.trunk_states(batch["input_ids"], batch["attention_mask"])
    got = setup.trunk_states("train", rows)
    assert torch.equal(got.z, want.z) and torch.equal(got.final, want.final) and torch.equal(z[rows], want.z)


def test_a_cache_of_other_inputs_is_refused_naming_what_differs(tmp_path):
    config_path, recipe_path = run_files(tmp_path)
    cache = write_cache(tmp_path, config_path, recipe_path)
    with pytest.raises(ConfigError, match=r"states.safetensors: written for other model_weights than this run"):
        prepared(config_path, recipe_path, trunk_cache=str(cache),
                 compute=load_config(config_path).compute.model_copy(update={"seed": 1}))
    with pytest.raises(ConfigError, match=r"written for other precision than"):
        prepared(config_path, recipe_path, trunk_cache=str(cache),
                 compute=load_config(config_path).compute.model_copy(update={"precision": "bf16"}))
    other_config, other_recipe = run_files(tmp_path / "other" if (tmp_path / "other").mkdir() is None else None,
                                           head_type="linear")
    with pytest.raises(ConfigError, match=r"written for other head_type than"):
        prepared(other_config, other_recipe, trunk_cache=str(cache))


def test_a_damaged_or_missing_cache_is_refused_in_one_line(tmp_path):
    config_path, recipe_path = run_files(tmp_path)
    cache = write_cache(tmp_path, config_path, recipe_path)
    data = cache.read_bytes()
    cache.write_bytes(data[:-100])
    with pytest.raises(ConfigError, match=r"states.safetensors: \d+ bytes, its header says \d+; the file is damaged"):
        prepared(config_path, recipe_path, trunk_cache=str(cache))
    cache.write_bytes(b"\xff" * 7)
    with pytest.raises(ConfigError, match="cannot read its header"):
        prepared(config_path, recipe_path, trunk_cache=str(cache))
    with pytest.raises(ConfigError, match="not found; create it with `wmtp cache-states`"):
        prepared(config_path, recipe_path, trunk_cache=str(tmp_path / "none.safetensors"))


def test_the_size_is_said_first_and_a_cache_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch, capsys):
    import shutil

    from wmtp.cli import main

    config_path, recipe_path = run_files(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=1000))
    out = tmp_path / "states.safetensors"
    assert main(["cache-states", "--config", str(config_path), "--recipe", str(recipe_path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    size = 2 * (90 + 13) * 32 * 32 * 4  # final and z, train and validation rows, 32 tokens, D 32, float32
    assert f"= {size / 2**20:.1f} MiB" in captured.out
    assert "the trunk cache needs" in captured.err and "GiB free" in captured.err
    assert not out.exists() and not list(tmp_path.glob(".states*"))


@pytest.mark.parametrize(("recipe", "config", "message"), [
    ({"mtp": {"n_heads": 3, "trainable": "all"}}, {}, "fixed only when it is frozen; set mtp.trainable: heads"),
    ({}, {"trunk_cache": "s3://bucket/states.safetensors"}, "must be a local file"),
])
def test_runs_that_cannot_read_a_cache_are_refused(tmp_path, recipe, config, message):
    from wmtp.cli import main

    config_path, recipe_path = run_files(tmp_path, recipe=recipe, config={"trunk_cache": str(tmp_path / "s"),
                                                                          **config})
    with pytest.raises(ConfigError, match=message):
        prepared(config_path, recipe_path)
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path), "--dry-run"]) == 1


def test_fsdp2_is_refused(tmp_path):
    from wmtp.config import load_recipe
    from wmtp.training.trunk_cache import check_trunk_cache

    config_path, recipe_path = run_files(tmp_path)
    config, recipe = load_config(config_path), load_recipe(recipe_path)
    with pytest.raises(ConfigError, match="not supported under compute.distributed: fsdp2"):
        check_trunk_cache(config, recipe, "fsdp2", 2, "states.safetensors")
    check_trunk_cache(config, recipe, "ddp", 2, "states.safetensors")


CONSTANT = {"kind": "function", "function": "helpers.rewards:constant"}


@pytest.mark.parametrize(("recipe", "message"), [
    ({"algorithm": "grpo", "grpo": {"reward": CONSTANT, "group_size": 4, "max_new_tokens": 6}},
     "algorithm grpo trains on completions it samples"),
    ({"algorithm": "critic", "critic": {"reward": CONSTANT}}, "algorithm critic runs the trunk for its value head"),
])
def test_schemes_that_run_the_trunk_themselves_refuse_a_cache(tmp_path, recipe, message):
    config_path, recipe_path = run_files(tmp_path)
    cache = write_cache(tmp_path, config_path, recipe_path)
    config_path, recipe_path = run_files(tmp_path, recipe=recipe)
    with pytest.raises(ConfigError, match=message):
        prepared(config_path, recipe_path, trunk_cache=str(cache))


def test_cache_states_needs_a_file_and_checks_it_before_reading_anything(tmp_path, capsys):
    from wmtp.cli import main

    config_path, recipe_path = run_files(tmp_path)
    assert main(["cache-states", "--config", str(config_path), "--recipe", str(recipe_path)]) == 1
    assert "trunk_cache: give the cache file (config key trunk_cache or --out)" in capsys.readouterr().err
    config_path, recipe_path = run_files(tmp_path, recipe={"mtp": {"n_heads": 3, "trainable": "all"}})
    assert main(["cache-states", "--config", str(config_path), "--recipe", str(recipe_path), "--out",
                 str(tmp_path / "s.safetensors")]) == 1
    assert "set mtp.trainable: heads" in capsys.readouterr().err and not (tmp_path / "s.safetensors").exists()
