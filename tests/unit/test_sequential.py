"""Sequential MTP modules (DeepSeek-V3 style, `mtp.head_type: sequential`, docs/method.md §2.1): the module's logits
against a plain implementation of the equations written here, the fast path against the plain reference loss with
gradients, activation checkpointing, save/load, the memory plan's block count and a tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import batch, fast_and_reference, grads_of, perturb_heads, tiny_llama
from helpers.tiny_run import train_args
from helpers.torchrun import run_torchrun

from wmtp import MTPLoss, MTPModel, mtp_labels
from wmtp.model.mtp import SequentialDepth
from wmtp.model.parallelize import apply_activation_checkpointing, blocks

N = 3


def sequential_model(seed: int = 0, *, tie: bool = False, n: int = N) -> MTPModel:
    model = MTPModel.from_base(tiny_llama(seed, tie=tie), n_heads=n, head_type="sequential").eval()
    perturb_heads(model)  # eh_proj = [0 | I] at init would hide a swapped concatenation
    return model


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def plain_logits(model: MTPModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, n, V] from the equations alone: depth 0 is the base model; depth k at position t reads
    e = emb(x[t+k]) (0 where t+k is past the end or padding) and h_{k-1,t} (depth 0: the trunk's output after its
    final norm), h_k = Block_k(W_k [RMSNorm(e) ; RMSNorm(h_{k-1})]), logits = U · RMSNorm_k(h_k)."""
    base = model.base
    eps = base.config.rms_norm_eps
    out = base.model(input_ids=x, attention_mask=mask)
    h = out.last_hidden_state  # after the trunk's final norm
    logits = [base.lm_head(h)]
    batch_size, seq = x.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch_size, seq)
    cos_sin = base.model.rotary_emb(h, positions)
    # the layer's mask: causal, padded keys masked (what the trunk's last layer gets)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    attn_mask = torch.zeros(batch_size, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    for k, depth in enumerate(model.heads, start=1):
        shifted = torch.zeros_like(x)
        shifted[:, : seq - k] = x[:, k:]
        present = torch.zeros_like(mask)
        present[:, : seq - k] = mask[:, k:]
        e = base.model.embed_tokens(shifted) * present.unsqueeze(-1)
        joined = torch.cat([rms(e, depth.enorm.weight, eps), rms(h, depth.hnorm.weight, eps)], dim=-1)  # emb first
        z = joined @ depth.eh_proj.weight.T
        h = depth.mtp_block(z, attention_mask=attn_mask, position_embeddings=cos_sin, position_ids=positions)
        h = h[0] if isinstance(h, tuple) else h
        logits.append(base.lm_head(rms(h, depth.norm.weight, eps)))
    return torch.stack(logits, dim=2)


def test_each_depth_is_its_own_module_and_starts_as_a_transformer_head_on_the_normed_trunk():
    model = MTPModel.from_base(tiny_llama(), n_heads=N, head_type="sequential").eval()
    assert len(model.heads) == N - 1 and all(isinstance(d, SequentialDepth) for d in model.heads)
    assert blocks(model)[-(N - 1):] == list(model.heads)
    d = model.config.hidden_size
    w = model.heads[0].eh_proj.weight
    assert w.shape == (d, 2 * d)
    assert torch.equal(w[:, :d], torch.zeros(d, d)) and torch.equal(w[:, d:], torch.eye(d))
    x, mask = batch()
    with torch.no_grad():
        logits = model(x, mask, return_logits=True).logits
        want = model.base(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(logits[:, :, 0], want, atol=1e-5, rtol=0)  # head 0 is the base model


def test_fresh_depths_read_the_trunk_state_at_the_scale_of_its_residual_stream(tmp_path):
    """`scale_fresh_depths`: hnorm's weight is the median RMS of the final norm's input over the valid positions,
    computed here by running the decoder layers by hand; a loaded model's depths are left alone."""
    from wmtp.model.mtp import scale_fresh_depths

    model = MTPModel.from_base(tiny_llama(), n_heads=N, head_type="sequential").eval()
    x, mask = batch()
    with torch.no_grad():
        inner = model.base.model
        h = inner.embed_tokens(x)
        seq = x.shape[1]
        positions = torch.arange(seq).unsqueeze(0).expand_as(x)
        cos_sin = inner.rotary_emb(h, positions)
        allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & mask.bool()[:, None, :]
        attn = torch.zeros(x.shape[0], 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        for layer in inner.layers:
            h = layer(h, attention_mask=attn, position_embeddings=cos_sin, position_ids=positions)
            h = h[0] if isinstance(h, tuple) else h
        want = h.pow(2).mean(-1).sqrt()[mask.bool()].median().item()
    assert abs(want - 1) > 0.5  # the residual stream is not at RMS 1, so the test can tell the two apart
    got = scale_fresh_depths(model, x, mask)
    assert got == pytest.approx(want, rel=1e-5)
    for depth in model.heads:
        assert torch.allclose(depth.hnorm.weight, torch.full_like(depth.hnorm.weight, want), rtol=1e-5)
        assert torch.equal(depth.enorm.weight, torch.ones_like(depth.enorm.weight))
    model.save_pretrained(tmp_path / "m")
    loaded = MTPModel.from_pretrained(tmp_path / "m")
    before = [d.hnorm.weight.clone() for d in loaded.heads]
    assert scale_fresh_depths(loaded, x, mask) is None
    assert all(torch.equal(a, d.hnorm.weight) for a, d in zip(before, loaded.heads, strict=True))


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_a_plain_implementation_of_the_equations(tie):
    model = sequential_model(tie=tie)
    x, mask = batch()
    with torch.no_grad():
        got = model(x, mask, return_logits=True).logits
        want = plain_logits(model, x, mask)
    valid = mtp_labels(x, N, attention_mask=mask) != -100
    assert got.shape == want.shape
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, :, 0], want[:, :, 0], rtol=1e-5, atol=1e-5)


def test_the_embedding_half_comes_first_and_depth_k_reads_the_token_k_ahead():
    model = sequential_model()
    x, mask = batch()
    d = model.config.hidden_size
    labels = mtp_labels(x, N, attention_mask=mask)
    with torch.no_grad():
        ref = model(x, mask, return_logits=True).logits
        y = x.clone()
        y[0, 5] = (x[0, 5] % 90) + 3
        alt = model(y, mask, return_logits=True).logits
        # depth k at position t sees x[<= t+k] and nothing later: (t, k) changes exactly when t + k >= 5
        for t in range(x.shape[1]):
            for k in range(N):
                assert torch.equal(alt[0, t, k], ref[0, t, k]) == (t + k < 5), (t, k)
        # zeroing the embedding half of W_1 removes exactly that dependence
        model.heads[0].eh_proj.weight[:, :d] = 0
        a = model(x, mask, return_logits=True).logits[:, :, 1]
        b = model(y, mask, return_logits=True).logits[:, :, 1]
        assert torch.equal(a[0, :5], b[0, :5])  # from t = 5 on the trunk state itself changes
    assert labels[0, 4, 1] == x[0, 6]  # depth k at t: target x[t+k+1]


@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
@pytest.mark.parametrize("tie", [False, True])
def test_fast_path_equals_reference_path_with_gradients(reduction, tie):
    model = sequential_model(tie=tie).train()
    x, mask = batch(2)
    doc = torch.zeros_like(x)
    doc[0, 6:] = 1  # a packed second document in row 0
    labels = mtp_labels(x, N, attention_mask=mask, document_ids=doc)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    loss, ref, fast, slow = fast_and_reference(model, x, mask, labels, weights, [1.0, 0.5, 0.25], reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    assert fast.keys() == slow.keys()
    assert any(".eh_proj." in k for k in fast) and any(".enorm." in k for k in fast)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-6, msg=name)


def test_weights_fn_gets_one_hidden_state_per_depth():
    model = sequential_model()
    x, mask = batch()
    labels = mtp_labels(x, N, attention_mask=mask)
    seen = []

    def weights_fn(hidden, m):
        seen.append([h.shape for h in hidden])
        return torch.ones(labels.shape)

    out = model(x, mask, MTPLoss(labels, weights_fn=weights_fn))
    plain = model(x, mask, MTPLoss(labels))
    assert seen == [[(*x.shape, model.config.hidden_size)] * N]
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_identical_gradients(every):
    def gradients(every):
        model = sequential_model(seed=1).train()
        n = apply_activation_checkpointing(model, every)
        assert n == (0 if every is None else len(blocks(model)[::every]))
        x, mask = batch()
        labels = mtp_labels(x, N, attention_mask=mask)
        weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))
        model(x, mask, MTPLoss(labels, weights)).loss.backward()
        return grads_of(model)

    plain, checkpointed = gradients(None), gradients(every)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_save_load_round_trip_is_exact(tmp_path):
    model = sequential_model()
    x, mask = batch()
    with torch.no_grad():
        before = model(x, mask, return_logits=True).logits
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["wmtp"] == {"n_heads": N, "head_type": "sequential", "format_version": 1}
    loaded = MTPModel.from_pretrained(tmp_path / "ckpt").eval()
    assert all(isinstance(d, SequentialDepth) for d in loaded.heads)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    with torch.no_grad():
        after = loaded(x, mask, return_logits=True).logits
    assert torch.equal(before, after)


def test_memory_plan_counts_the_depths():
    from wmtp.model.memory import PlanInputs, estimate, flops_per_token

    def plan(head_type):
        with torch.device("meta"):
            model = MTPModel.from_base(tiny_llama(layers=3), n_heads=N, head_type=head_type)
        inputs = PlanInputs(world_size=2, strategy="fsdp2", param_dtype=torch.float32, gather_dtype=None,
                            reduce_dtype=None, autocast_dtype=None, cpu_offload=False, checkpoint_every=None,
                            micro_batch_size=2, seq_len=16, chunk_size=8)
        return estimate(model, inputs), flops_per_token(model, 16)

    (seq, seq_flops), (tr, tr_flops) = plan("sequential"), plan("transformer")
    assert seq.blocks == tr.blocks == 3 + N - 1
    d = 32
    assert seq.params_total - tr.params_total == (N - 1) * (2 * d * d + 3 * d)  # eh_proj and three norms per depth
    assert seq.activations > tr.activations and seq_flops > tr_flops


def test_tiny_training_run_with_sequential_heads_then_eval_with_speculative_statistics(tmp_path):
    """`wmtp train` with sequential heads, then `wmtp eval` on the checkpoint: its self-speculative section drafts
    with the depths (chain drafting) and reports acceptance per depth."""
    from wmtp.cli import main

    mbpp = Path(__file__).resolve().parents[2] / "data" / "mbpp"
    config = {"datasets": {"mbpp": str(mbpp)}}
    assert main(train_args(tmp_path, config=config, recipe={"mtp": {"head_type": "sequential"},
                                                            "train": {"max_steps": 3}})) == 0
    final = tmp_path / "runs" / "run" / "final"
    model = MTPModel.from_pretrained(final)
    assert model.mtp_config.head_type == "sequential" and model.n_heads == 3
    assert all(isinstance(d, SequentialDepth) for d in model.heads)
    assert not torch.equal(model.heads[0].eh_proj.weight[:, :32], torch.zeros(32, 32))  # the modules trained
    # the run scaled its fresh depths to the trunk's residual stream before step 1 (RMS about 0.02 in this random
    # trunk; a norm weight moves by about the learning rate per step, so after 3 steps it is still far from 1)
    assert all(d.hnorm.weight.mean() < 0.5 for d in model.heads)
    out = tmp_path / "ev"
    config_path, recipe_path = tmp_path / "config.yaml", tmp_path / "recipe.yaml"
    assert main(["eval", "--config", str(config_path), "--recipe", str(recipe_path), "--checkpoint", str(final),
                 "--benchmarks", "mbpp", "--limit", "2", "--max-new-tokens", "12", "--no-heads",
                 "--speculative-prompts", "2", "--out", str(out)]) == 0
    spec = json.loads((out / "results.json").read_text())["speculative"]
    assert spec["prompts"] == 2 and spec["mean_accepted_length"] >= 1.0
    assert len(spec["acceptance_per_head"]) == 2 and spec["forward_passes"] > 0


def test_fsdp2_wraps_each_depth_as_its_own_unit_with_the_same_loss_and_gradients(one_rank_group):
    import copy

    from wmtp.model.parallelize import wrap_model
    from wmtp.runtime.distributed import DistInfo

    model = sequential_model().train()
    plain = copy.deepcopy(model)
    apply_activation_checkpointing(model, 1)
    wrap_model(model, DistInfo(0, 2, 0, torch.device("cpu")), "fsdp2")
    for depth in model.heads:
        assert depth._get_fsdp_state()._fsdp_param_group is not None  # a unit of its own
    x, mask = batch()
    labels = mtp_labels(x, N, attention_mask=mask)
    got = model(x, mask, MTPLoss(labels))
    got.loss.backward()
    want = plain(x, mask, MTPLoss(labels))
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    want_grads = grads_of(plain)
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_valid_pair_has_its_input_token_in_the_same_document():
    from wmtp.model.mtp import shifted_inputs

    g = torch.Generator().manual_seed(5)
    x = torch.randint(3, 97, (4, 16), generator=g)
    mask = torch.ones_like(x)
    mask[1, -5:] = 0
    mask[2, :3] = 0  # left padding too
    doc = torch.cumsum(torch.rand(x.shape, generator=g) < 0.2, dim=1)
    labels = mtp_labels(x, 4, attention_mask=mask, document_ids=doc)
    for k in range(1, 4):
        ids, present = shifted_inputs(x, k, mask)
        valid = labels[:, :, k] != -100
        assert bool(present[valid].all())
        assert torch.equal(ids[valid], x[:, k:][valid[:, : 16 - k]])
        same_doc = torch.zeros_like(valid)
        same_doc[:, : 16 - k] = doc[:, k:] == doc[:, :-k]
        assert bool(same_doc[valid].all())
        rows, cols = valid.nonzero(as_tuple=True)
        assert torch.equal(labels[rows, cols, k], x[rows, cols + k + 1])  # the target is the token after the input
        assert not bool(present[:, 16 - k:].any())  # past the row: missing, embedding zeroed


@pytest.mark.slow
def test_two_gloo_ranks_under_fsdp2_with_checkpointing_equal_one_process(tmp_path):
    """Each depth is an FSDP2 unit, built on the meta device and filled from rank 0, and recomputed in the backward:
    two ranks (2 x 2 rows) end where one process (4 rows) ends."""
    import os
    import sys
    from pathlib import Path

    from helpers.tiny_run import final_weights

    from wmtp.cli import main

    recipe = {"mtp": {"head_type": "sequential"}, "train": {"max_steps": 3, "micro_batch_size": 4}}
    assert main(train_args(tmp_path, "one", recipe=recipe)) == 0
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    args = train_args(tmp_path, "two", recipe={**recipe, "train": {"max_steps": 3, "micro_batch_size": 2}},
                      config={"compute": {"distributed": "fsdp2", "activation_checkpointing": "all"}})
    proc = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                         "-m", "wmtp", *args], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "two")
    assert one.keys() == two.keys() and any(".eh_proj." in k for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=5e-5, rtol=1e-4, msg=key)


def test_trainable_heads_trains_only_the_depths():
    model = sequential_model().train().set_trainable("heads")
    x, mask = batch()
    model(x, mask, MTPLoss(mtp_labels(x, N, attention_mask=mask))).loss.backward()
    grads = grads_of(model)
    assert grads and all(name.startswith("heads.") for name in grads)
    assert len(grads) == sum(1 for _ in model.heads.parameters())
