import json

import pytest
import torch
from helpers.models import batch, fast_and_reference, grads_of, perturb_heads, tiny_gpt2, tiny_llama

from wmtp import MTPLoss, MTPModel, loss_denominator, mtp_labels


@pytest.mark.parametrize("make_base,head_type", [(tiny_llama, "transformer"), (tiny_llama, "linear"),
                                                  (tiny_gpt2, "transformer"), (tiny_gpt2, "linear")])
def test_head0_is_the_base_model_bit_for_bit(make_base, head_type):
    base = make_base()
    x, mask = batch()
    with torch.no_grad():
        want = base(input_ids=x, attention_mask=mask).logits
        model = MTPModel.from_base(base, n_heads=4, head_type=head_type).eval()
        got = model(x, mask, return_logits=True).logits
    assert got.shape == (*x.shape, 4, base.config.vocab_size)
    assert torch.allclose(got[:, :, 0], want, atol=1e-5, rtol=0)
    if head_type == "linear":  # zero-initialised residual heads start as the identity
        assert torch.allclose(got[:, :, 3], want, atol=1e-5, rtol=0)


def test_n1_uniform_equals_the_base_models_own_loss(llama):
    x, mask = batch()
    hf_labels = x.masked_fill(mask == 0, -100)
    want = llama(input_ids=x, attention_mask=mask, labels=hf_labels).loss
    model = MTPModel.from_base(llama, n_heads=1)
    labels = mtp_labels(x, 1, attention_mask=mask)
    got = model(x, mask, MTPLoss(labels)).loss
    assert torch.allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
def test_fast_path_equals_reference_path_with_gradients(head_type, reduction):
    model = MTPModel.from_base(tiny_llama(tie=True), n_heads=3, head_type=head_type)
    perturb_heads(model)
    x, mask = batch(2)
    labels = mtp_labels(x, 3, attention_mask=mask)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    loss, ref, fast, slow = fast_and_reference(model, x, mask, labels, weights, [1.0, 0.5, 0.5], reduction)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert fast.keys() == slow.keys() and len(fast) > 10
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
def test_gradient_accumulation_invariance_8x1_equals_1x8(reduction):
    torch.manual_seed(0)
    x = torch.randint(3, 97, (8, 10))
    mask = torch.ones_like(x)
    for i in range(8):
        mask[i, 10 - i:] = 0  # different lengths: per-micro-batch means would differ
    labels = mtp_labels(x, 3, attention_mask=mask)
    weights = torch.rand(labels.shape)

    model = MTPModel.from_base(tiny_llama(), n_heads=3)
    model(x, mask, MTPLoss(labels, weights, reduction=reduction)).loss.backward()
    full = grads_of(model)

    model.zero_grad(set_to_none=True)
    total = loss_denominator(labels, weights, reduction=reduction)  # what the trainer sums over the step
    for i in range(8):
        sl = slice(i, i + 1)
        model(x[sl], mask[sl], MTPLoss(labels[sl], weights[sl], reduction=reduction, normalizer=total)).loss.backward()
    accumulated = grads_of(model)
    for name in full:
        assert torch.allclose(full[name], accumulated[name], rtol=1e-4, atol=1e-7), name

    # and the per-micro-batch mean (what the seed did) is measurably different
    model.zero_grad(set_to_none=True)
    for i in range(8):
        sl = slice(i, i + 1)
        (model(x[sl], mask[sl], MTPLoss(labels[sl], weights[sl], reduction=reduction)).loss / 8).backward()
    naive = grads_of(model)
    assert any(not torch.allclose(full[k], naive[k], rtol=1e-3) for k in full)


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
def test_save_load_round_trip_is_exact(tmp_path, head_type):
    model = MTPModel.from_base(tiny_llama(), n_heads=4, head_type=head_type).eval()
    perturb_heads(model)
    x, mask = batch()
    with torch.no_grad():
        before = model(x, mask, return_logits=True).logits
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["wmtp"] == {"n_heads": 4, "head_type": head_type, "format_version": 1}
    assert not list(tmp_path.glob(".ckpt.*")), "temporary directory left behind"
    loaded = MTPModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        after = loaded(x, mask, return_logits=True).logits
    assert torch.equal(before, after)
    assert not hasattr(loaded.base.config, "wmtp")  # the base model alone saves as a plain causal LM
    loaded.base.save_pretrained(tmp_path / "plain")
    assert "wmtp" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_saved_base_is_a_plain_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x, mask = batch()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x, attention_mask=mask).logits,
                           model(x, mask, return_logits=True).logits[:, :, 0])


def test_loading_a_plain_model_directory_says_what_to_do(tmp_path, llama):
    llama.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="from_base"):
        MTPModel.from_pretrained(tmp_path / "plain")


def test_generate_uses_head0_with_kv_cache(llama):
    model = MTPModel.from_base(llama, n_heads=3).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 10)
    # greedy decoding by hand with head 0, no cache
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            nxt = model(seq, return_logits=True).logits[:, -1, 0].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_unsupported_logit_transform_is_refused():
    base = tiny_llama()
    base.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        MTPModel.from_base(base, n_heads=2)
