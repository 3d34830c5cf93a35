"""Import of Meta's MTP checkpoint layout, checked against a direct reimplementation of Meta's forward."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from wmtp.meta_checkpoint import load_meta_mtp_checkpoint, meta_ffn_hidden_dim

PARAMS = {"dim": 64, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 101, "multiple_of": 32,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0, "n_future_tokens": 3}


def meta_state(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim, nh, nkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd = dim // nh
    ffn = meta_ffn_hidden_dim(dim, params["multiple_of"], params["ffn_dim_multiplier"])

    def r(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def block(prefix):
        return {
            f"{prefix}.attention.wq.weight": r(nh * hd, dim), f"{prefix}.attention.wk.weight": r(nkv * hd, dim),
            f"{prefix}.attention.wv.weight": r(nkv * hd, dim), f"{prefix}.attention.wo.weight": r(dim, nh * hd),
            f"{prefix}.feed_forward.w1.weight": r(ffn, dim), f"{prefix}.feed_forward.w2.weight": r(dim, ffn),
            f"{prefix}.feed_forward.w3.weight": r(ffn, dim),
            f"{prefix}.attention_norm.weight": 1 + r(dim, scale=0.1),
            f"{prefix}.ffn_norm.weight": 1 + r(dim, scale=0.1),
        }

    state = {"tok_embeddings.weight": r(params["vocab_size"], dim, scale=1.0), "norm.weight": 1 + r(dim, scale=0.1),
             "output.weight": r(params["vocab_size"], dim)}
    n_blocks = params["n_layers"] - params["n_future_tokens"] + 1
    for i in range(n_blocks):
        state.update(block(f"layers.{i}"))
    for k in range(params["n_future_tokens"] - 1):
        state.update(block(f"extra_heads.{k}"))
    return state


def meta_forward(state, params, tokens):
    """Meta's multi-token Llama forward (facebook/multi-token-prediction, llama/model.py), all heads:
    complex (adjacent-pair) rotary, GQA, SwiGLU, trunk = layers[:-1], heads = [layers[-1]] + extra_heads."""
    dim, nh, nkv, eps = params["dim"], params["n_heads"], params["n_kv_heads"], params["norm_eps"]
    hd = dim // nh
    _, S = tokens.shape
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(S, hd // 2), torch.outer(torch.arange(S).float(), freqs))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def block(p, x):
        h = rms(x, state[f"{p}.attention_norm.weight"])
        B = x.shape[0]
        q = (h @ state[f"{p}.attention.wq.weight"].t()).view(B, S, nh, hd)
        k = (h @ state[f"{p}.attention.wk.weight"].t()).view(B, S, nkv, hd)
        v = (h @ state[f"{p}.attention.wv.weight"].t()).view(B, S, nkv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores + torch.full((S, S), float("-inf")).triu(1)
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, dim)
        x = x + att @ state[f"{p}.attention.wo.weight"].t()
        h = rms(x, state[f"{p}.ffn_norm.weight"])
        ff = (F.silu(h @ state[f"{p}.feed_forward.w1.weight"].t()) * (h @ state[f"{p}.feed_forward.w3.weight"].t()))
        return x + ff @ state[f"{p}.feed_forward.w2.weight"].t()

    n_blocks = params["n_layers"] - params["n_future_tokens"] + 1
    h = state["tok_embeddings.weight"][tokens]
    for i in range(n_blocks - 1):
        h = block(f"layers.{i}", h)
    heads = [f"layers.{n_blocks - 1}"] + [f"extra_heads.{k}" for k in range(params["n_future_tokens"] - 1)]
    latents = torch.stack([block(p, h) for p in heads], dim=-2)
    return rms(latents, state["norm.weight"]) @ state["output.weight"].t()


def write_checkpoint(directory, params, state):
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(state, directory / "consolidated.pth")


def test_meta_layout_import_matches_metas_forward(tmp_path):
    state = meta_state(PARAMS)
    write_checkpoint(tmp_path / "7B_1T_4_tiny", PARAMS, state)
    model = load_meta_mtp_checkpoint(tmp_path / "7B_1T_4_tiny").eval()
    assert model.n_heads == 3 and model.mtp_config.head_type == "transformer"
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens, return_logits=True).logits
        want = meta_forward(state, PARAMS, tokens)
    assert got.shape == want.shape == (2, 10, 3, PARAMS["vocab_size"])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_meta_import_without_rotary_permutation_would_differ(tmp_path):
    # Guards the test above: skipping the q/k permutation must change the logits.
    import wmtp.meta_checkpoint as mc

    state = meta_state(PARAMS)
    write_checkpoint(tmp_path / "ck", PARAMS, state)
    original = mc.rotary_permute
    mc.rotary_permute = lambda w, n: w
    try:
        model = load_meta_mtp_checkpoint(tmp_path / "ck").eval()
    finally:
        mc.rotary_permute = original
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(tokens, return_logits=True).logits, meta_forward(state, PARAMS, tokens),
                                  atol=1e-3)


def test_meta_import_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_meta_mtp_checkpoint(tmp_path)
    state = meta_state(PARAMS)
    del state["extra_heads.1.attention.wq.weight"]
    write_checkpoint(tmp_path / "broken", PARAMS, state)
    with pytest.raises(ValueError, match="extra_heads.1.attention.wq.weight"):
        load_meta_mtp_checkpoint(tmp_path / "broken")
