"""Tiny Hugging Face models with random weights (transformers' own config classes), seeded."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama(seed: int = 0, *, layers: int = 3, vocab: int = VOCAB, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def batch(seed=0, B=3, S=12, V=97):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    x[1, -4:] = 0
    return x, mask


def perturb_heads(model, seed=1):
    """Give the extra heads their own weights so that a mix-up between heads shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def grads_of(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def fast_and_reference(model, x, mask, labels, weights, head_coef, reduction):
    """The fused fast path and the plain reference loss (`weighted_mtp_loss` on the full logits) of one batch,
    each with the gradients it gives: (fast loss, reference loss, fast gradients, reference gradients)."""
    from wmtp import weighted_mtp_loss
    from wmtp.model.mtp import MTPLoss

    out = model(x, mask, MTPLoss(labels, weights, head_coef=head_coef, reduction=reduction, chunk_size=7))
    out.loss.backward()
    fast = grads_of(model)
    model.zero_grad(set_to_none=True)
    ref = weighted_mtp_loss(model(x, mask, return_logits=True).logits, labels, weights, head_coef=head_coef,
                            reduction=reduction)
    ref.backward()
    return out.loss, ref, fast, grads_of(model)
