"""Memory techniques applied from outside the model: activation checkpointing (the same gradients, fewer saved
activations) and FSDP2's mixed precision and CPU offload (with two gloo ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_llama
from helpers.tiny_run import final_weights, train_args
from helpers.torchrun import run_torchrun

from wmtp.cli import main
from wmtp.loss import mtp_labels
from wmtp.model.mtp import MTPLoss, MTPModel
from wmtp.model.parallelize import apply_activation_checkpointing, blocks, wrap_model
from wmtp.runtime.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]


def gradients_and_saved(head_type: str, every: int | None) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one weighted MTP loss, and how many tensors autograd saved for the backward."""
    model = MTPModel.from_base(tiny_llama(seed=1, layers=3), n_heads=3, head_type=head_type).train()
    assert apply_activation_checkpointing(model, every) == (0 if every is None else len(blocks(model)[::every]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 24), generator=g)
    labels = mtp_labels(ids, 3)
    weights = torch.rand(labels.shape, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(ids, torch.ones_like(ids), MTPLoss(labels, weights)).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(head_type, every):
    plain, kept = gradients_and_saved(head_type, None)
    checkpointed, kept_checkpointed = gradients_and_saved(head_type, every)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    assert kept_checkpointed < kept


def test_checkpointing_keeps_parameter_names():
    model = MTPModel.from_base(tiny_llama(), n_heads=3)
    names = list(model.state_dict())
    apply_activation_checkpointing(model, 1)
    assert list(model.state_dict()) == names


def fsdp_state(module):
    return module._get_fsdp_state()


def test_fsdp_policies_reach_every_sharded_block(one_rank_group):
    model = MTPModel.from_base(tiny_llama(), n_heads=3)
    as_if_two = DistInfo(0, 2, 0, torch.device("cpu"))  # wrap_model shards when distributed
    wrap_model(model, as_if_two, "fsdp2", param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cpu_offload=True)
    for module in [*blocks(model), model]:
        state = fsdp_state(module)
        assert state._mp_policy.param_dtype == torch.bfloat16 and state._mp_policy.reduce_dtype == torch.float32
        assert type(state._fsdp_param_group.offload_policy).__name__ == "CPUOffloadPolicy"
    seen = []
    blocks(model)[0].register_forward_pre_hook(lambda m, a: seen.append(m.self_attn.q_proj.weight.dtype))
    ids = torch.randint(3, 97, (1, 8))
    model(ids, torch.ones_like(ids), MTPLoss(mtp_labels(ids, 3))).loss.backward()
    assert seen == [torch.bfloat16]  # the gathered parameters the block computes with


@pytest.mark.slow
def test_two_ranks_with_offload_and_checkpointing_equal_one_process_and_bf16_parameters_differ(tmp_path):
    recipe_one = {"train": {"max_steps": 3, "micro_batch_size": 4}}
    recipe_two = {"train": {"max_steps": 3, "micro_batch_size": 2}}
    assert main(train_args(tmp_path, "one", recipe=recipe_one)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    finals = {}
    for name, compute in (("offload", {"fsdp": {"cpu_offload": True}, "activation_checkpointing": "all"}),
                          ("bf16", {"fsdp": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})):
        args = train_args(tmp_path, name, recipe=recipe_two, config={"compute": {"distributed": "fsdp2", **compute}})
        proc = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "-m", "wmtp", *args], env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        finals[name] = final_weights(tmp_path / "runs" / name)
    one = final_weights(tmp_path / "runs" / "one")
    for key in one:  # offload and recomputation change where and when, not what: one process's weights
        assert torch.allclose(finals["offload"][key], one[key], atol=5e-5, rtol=1e-4), key
    # bf16 parameters compute in bf16: the weights move off the fp32 run by far more than float-order noise
    assert max(float((finals["bf16"][k] - one[k]).abs().max()) for k in one) > 1e-3
    assert all(torch.isfinite(v).all() for v in finals["bf16"].values())


CONSTRUCTION = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from helpers.tiny_run import files
import wmtp.training.build as setup_module
from wmtp.runtime import distributed as dist_utils
from wmtp.config import load_config, load_recipe

built = []
original = setup_module.build_model
setup_module.build_model = lambda *a, **k: built.append(1) or original(*a, **k)
config, recipe = load_config({config!r}), load_recipe({recipe!r})
info = dist_utils.init_distributed("cpu")
setup = setup_module.prepare(config, recipe, info)
full = {{k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
        for k, v in setup.model.state_dict().items()}}
local = sum(p.to_local().numel() for p in setup.model.parameters())
if info.rank == 0:
    json.dump({{"full": full, "config": setup.model.config.to_dict()}}, open({out!r}, "w"))
print(json.dumps({{"rank": info.rank, "built_full_model": len(built), "local_numel": local}}))
dist_utils.shutdown()
"""


@pytest.mark.slow
def test_fsdp2_ranks_build_on_meta_and_receive_only_their_shards(tmp_path):
    """Under FSDP2 only rank 0 loads (here: initialises) the whole model; each rank holds half the parameters; the
    weights and config equal those of a plain single-process set-up."""
    import json

    from helpers.tiny_run import files

    from wmtp.config import load_config, load_recipe
    from wmtp.training.build import prepare

    config, recipe = files(tmp_path, config={"compute": {"distributed": "fsdp2"}})
    out = tmp_path / "rank0.json"
    code = CONSTRUCTION.format(tests=str(Path(__file__).parents[1]), config=str(config), recipe=str(recipe),
                               out=str(out))
    script = tmp_path / "construct.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["built_full_model"] for r in ranks] == [1, 0]
    plain = prepare(load_config(config), load_recipe(recipe), DistInfo(0, 1, 0, torch.device("cpu")))
    total = sum(p.numel() for p in plain.model.parameters())
    assert all(r["local_numel"] < 0.6 * total for r in ranks)
    sharded = json.loads(out.read_text())
    for key, value in plain.model.state_dict().items():
        assert torch.equal(torch.tensor(sharded["full"][key], dtype=value.dtype), value), key
    assert sharded["config"]["bos_token_id"] == plain.model.config.bos_token_id
