"""The memory plan and the FLOPs count: each component against a hand computation, the meta-device trace against
a real one, and `wmtp plan` / `--dry-run` output."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from helpers.tiny_run import files, train_args

from wmtp.cli import main
from wmtp.config import ModelSource, MTPShape
from wmtp.model.memory import PlanInputs, estimate, flops_per_token, meta_model, saved_bytes
from wmtp.model.mtp import MTPModel
from wmtp.model.parallelize import blocks

SCRATCH = ModelSource(from_scratch={"hidden_size": 64, "num_layers": 3, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "intermediate_size": 128,
                                    "max_position_embeddings": 256, "tie_word_embeddings": False},
                      train_tokenizer={"vocab_size": 500})


def inputs(**overrides) -> PlanInputs:
    base = {"world_size": 1, "strategy": "ddp", "param_dtype": torch.float32, "gather_dtype": None,
            "reduce_dtype": None, "autocast_dtype": None, "cpu_offload": False, "checkpoint_every": None,
            "micro_batch_size": 2, "seq_len": 64, "chunk_size": 32}
    return PlanInputs(**{**base, **overrides})


def test_state_bytes_follow_the_parameters_and_the_sharding():
    model = meta_model(SCRATCH, MTPShape(n_heads=3), 500)
    params = sum(p.numel() for p in model.parameters())
    one = estimate(model, inputs())
    assert one.parameters == params * 4 and one.gradients == params * 4 and one.optimizer == 2 * params * 4
    ddp = estimate(model, inputs(world_size=2))
    assert ddp.parameters == one.parameters and ddp.gradients == 2 * one.gradients  # DDP's bucket copy
    fsdp = estimate(model, inputs(world_size=2, strategy="fsdp2"))
    assert fsdp.parameters == params * 4 // 2 and fsdp.optimizer == params * 4
    assert fsdp.gathered > 0 and one.gathered == 0
    offload = estimate(model, inputs(world_size=2, strategy="fsdp2", cpu_offload=True))
    assert offload.parameters == offload.gradients == offload.optimizer == 0
    assert offload.host == fsdp.parameters + fsdp.gradients + fsdp.optimizer
    bf16 = estimate(model, inputs(world_size=2, strategy="fsdp2", gather_dtype=torch.bfloat16))
    assert bf16.gathered * 2 == fsdp.gathered and bf16.activations < fsdp.activations
    fp32_reduce = estimate(model, inputs(world_size=2, strategy="fsdp2", gather_dtype=torch.bfloat16,
                                         reduce_dtype=torch.float32))
    assert bf16.gathered < fp32_reduce.gathered < fsdp.gathered


def test_activations_scale_with_the_batch_and_checkpointing_keeps_less():
    model = meta_model(SCRATCH, MTPShape(n_heads=3), 500)
    base = estimate(model, inputs())
    double = estimate(model, inputs(micro_batch_size=4))
    assert double.activations == 2 * base.activations
    every = estimate(model, inputs(checkpoint_every=1))
    half = estimate(model, inputs(checkpoint_every=2))
    assert every.activations < half.activations < base.activations
    assert every.activations_without_checkpointing == base.activations and every.blocks == 3 + 2


def test_the_meta_trace_counts_what_a_real_forward_saves():
    torch.manual_seed(0)
    model = MTPModel.from_base(tiny_llama(layers=2), n_heads=2).train()
    block = blocks(model)[0]
    inner = model.base.model
    x = torch.randn(2, 16, 32, requires_grad=True)
    position_ids = torch.arange(16).unsqueeze(0).expand(2, 16)
    kwargs = {"position_embeddings": inner.rotary_emb(x, position_ids), "position_ids": position_ids,
              "attention_mask": None}
    real = saved_bytes(block, x, **kwargs)
    with torch.device("meta"):
        meta_block = MTPModel.from_base(tiny_llama(layers=2).to("meta"), n_heads=2).heads[0]
        xm = torch.zeros(2, 16, 32, requires_grad=True)
        meta_kwargs = {"position_embeddings": tuple(t.to("meta") for t in kwargs["position_embeddings"]),
                       "position_ids": position_ids.to("meta"), "attention_mask": None}
        meta = saved_bytes(meta_block, xm, **meta_kwargs)
    assert real == meta > 2 * 16 * 32 * 4


def test_flops_per_token_counts_six_per_weight_and_attention():
    model = MTPModel.from_base(tiny_llama(layers=3), n_heads=3)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.base.model.embed_tokens.weight.numel()
    expected = 6 * (params - embedding) + 12 * (3 + 2) * 32 * 128
    assert flops_per_token(model, 128) == expected
    tied = MTPModel.from_base(tiny_llama(layers=3, tie=True), n_heads=3)  # the tied matrix does multiply
    assert flops_per_token(tied, 128) == 6 * sum(p.numel() for p in tied.parameters()) + 12 * 5 * 32 * 128


def test_plan_command_prints_per_rank_bytes_and_the_verdict(tmp_path, capsys):
    config, recipe = files(tmp_path)
    assert main(["plan", "--config", str(config), "--recipe", str(recipe), "--world-size", "4",
                 "--device-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank (4 ranks, ddp" in out and "optimizer (AdamW)" in out and "fits in" in out
    assert main(["plan", "--config", str(config), "--recipe", str(recipe), "--device-memory", "1KB"]) == 0
    assert "does NOT fit in" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a usage error: argparse's message and exit code 2
        main(["plan", "--config", str(config), "--recipe", str(recipe), "--device-memory", "lots"])


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert main([*train_args(tmp_path), "--dry-run", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank (1 rank" in out and "total per rank" in out and "fits in 74.51 GiB" in out
    assert "training FLOPs per token" in out
