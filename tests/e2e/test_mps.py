"""Apple MPS: how `compute.device` picks it (tested everywhere), and the fast path, training and generation on an
MPS device (marked `mps`; they run on a Mac with Apple silicon and skip elsewhere)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import batch, grads_of, perturb_heads, tiny_llama
from helpers.tiny_run import final_weights, train_args

import wmtp.runtime.distributed
from wmtp import MTPLoss, MTPModel, mtp_labels, weighted_mtp_loss
from wmtp.cli import main
from wmtp.runtime.distributed import init_distributed, resolve_device

needs_mps = pytest.mark.skipif(not wmtp.runtime.distributed.mps_available(), reason="needs an Apple MPS device")


def test_auto_takes_mps_after_cuda_and_mps_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(wmtp.runtime.distributed, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") and resolve_device("mps") == torch.device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun with MPS is not supported"):
        init_distributed("mps")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(wmtp.runtime.distributed, "mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="compute.device is mps but MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


@pytest.mark.mps
@needs_mps
def test_fast_path_on_mps_equals_the_cpu_reference():
    model = MTPModel.from_base(tiny_llama(tie=True), n_heads=3, head_type="transformer")
    perturb_heads(model)
    x, mask = batch(2)
    labels = mtp_labels(x, 3, attention_mask=mask)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    ref = weighted_mtp_loss(model(x, mask, return_logits=True).logits, labels, weights)
    ref.backward()
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    model.to("mps")
    out = model(x.to("mps"), mask.to("mps"), MTPLoss(labels.to("mps"), weights.to("mps"), chunk_size=7))
    out.loss.backward()
    got = grads_of(model)
    assert torch.allclose(out.loss.cpu(), ref, rtol=1e-4)
    for name in want:
        assert torch.allclose(got[name].cpu(), want[name], rtol=1e-3, atol=1e-5), name


@pytest.mark.mps
@needs_mps
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_on_mps_trains_like_the_cpu_run(tmp_path, precision):
    recipe = {"train": {"max_steps": 3}}
    assert main(train_args(tmp_path, "cpu", recipe=recipe)) == 0
    config = {"compute": {"device": "mps", "precision": precision}}
    assert main(train_args(tmp_path, "mps", config=config, recipe=recipe)) == 0
    cpu, mps = final_weights(tmp_path / "runs" / "cpu"), final_weights(tmp_path / "runs" / "mps")
    tolerance = 1e-3 if precision == "fp32" else 3e-2  # float sums in another order; bf16 forwards
    for key in cpu:
        assert torch.allclose(cpu[key], mps[key], atol=tolerance, rtol=0), key


@pytest.mark.mps
@needs_mps
def test_generation_on_mps_matches_cpu():
    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    got = model.to("mps").generate(prompt.to("mps"), max_new_tokens=8, do_sample=False)
    assert torch.equal(want, got.cpu())
