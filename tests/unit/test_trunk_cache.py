"""The trunk-state cache (`wmtp cache-states`, config `trunk_cache`): heads trained from the frozen trunk's cached
states see what they see through the trunk; the cache file's format, fingerprint and refusals."""

from pathlib import Path

import pytest
import torch
from helpers.models import batch, grads_of, perturb_heads, tiny_gpt2, tiny_llama

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
