"""Import of Meta's MTP checkpoint layout, checked against a direct reimplementation of Meta's forward."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from wmtp.model.meta import load_meta_mtp_checkpoint, meta_ffn_hidden_dim

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
    import wmtp.model.meta as mc

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


# ------------------------------------------------------------------------------------------------ Meta's release
SNIPPETS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nprint(f{i}({i}))\n" for i in range(300)]


def sentencepiece_model(path, vocab_size: int = 320):
    """A Llama-style SentencePiece BPE model (byte fallback, no whitespace folding) trained on code snippets."""
    import sentencepiece

    corpus = path.parent / "sp_corpus.txt"
    corpus.write_text("".join(SNIPPETS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        minloglevel=2)
    return path


def split_for_model_parallel(state: dict, parts: int) -> list[dict]:
    """The shards Meta's model-parallel training writes: column-parallel weights split by rows, row-parallel
    ones and the embedding by columns, norms replicated."""
    from wmtp.model.meta import _COLUMN_PARALLEL, _ROW_PARALLEL

    shards = [{} for _ in range(parts)]
    for key, value in state.items():
        chunks = (value.chunk(parts, dim=0) if key.endswith(_COLUMN_PARALLEL) else
                  value.chunk(parts, dim=1) if key.endswith(_ROW_PARALLEL) else [value] * parts)
        for shard, chunk in zip(shards, chunks, strict=True):
            shard[key] = chunk.clone()
    return shards


META_PARAMS = {**PARAMS, "vocab_size": 320}


def meta_release(directory, shards: int = 2):
    """A tiny Meta release: params.json, `shards` consolidated.NN.pth files and a SentencePiece tokenizer.model."""
    state = meta_state(META_PARAMS)
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(META_PARAMS))
    for i, shard in enumerate(split_for_model_parallel(state, shards)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    sentencepiece_model(directory / "tokenizer.model")
    return state


def test_model_parallel_shards_merge_to_the_whole(tmp_path):
    from wmtp.model.meta import read_consolidated

    state = meta_release(tmp_path / "release", shards=2)
    merged = read_consolidated(tmp_path / "release")
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    model = load_meta_mtp_checkpoint(tmp_path / "release").eval()
    tokens = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(tokens, return_logits=True).logits, meta_forward(state, META_PARAMS, tokens),
                              atol=1e-5, rtol=1e-4)
    torch.save({**torch.load(tmp_path / "release" / "consolidated.01.pth"), "norm.weight": torch.zeros(64)},
               tmp_path / "release" / "consolidated.01.pth")
    with pytest.raises(ValueError, match="`norm.weight` differs between shards"):
        read_consolidated(tmp_path / "release")


def test_the_sentencepiece_tokenizer_converts_to_the_same_ids(tmp_path):
    import sentencepiece

    from wmtp.model.meta import convert_sentencepiece

    path = sentencepiece_model(tmp_path / "tokenizer.model")
    tokenizer = convert_sentencepiece(path)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert tokenizer.is_fast and len(tokenizer) == processor.get_piece_size() == 320
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    for text in [*SNIPPETS[:5], "  two leading spaces", "\ttab", "é 文字 🙂 bytes", "x  y   z"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == processor.decode(ids) == text


def test_a_meta_release_trains_directly_and_after_convert_meta(tmp_path, capsys):
    from helpers.tiny_run import train_args
    from transformers import AutoModelForCausalLM

    from wmtp.cli import main
    from wmtp.model.mtp import MTPModel

    meta_release(tmp_path / "release")
    assert main(["convert-meta", str(tmp_path / "release"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert "3 heads" in capsys.readouterr().out
    direct = load_meta_mtp_checkpoint(tmp_path / "release")
    converted = MTPModel.from_pretrained(tmp_path / "hf")
    for key, value in direct.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # head 0 as a plain Llama
    recipe = {"mtp": {"n_heads": 3}, "train": {"max_steps": 2}}
    for name, path in (("direct", tmp_path / "release"), ("converted", tmp_path / "hf")):
        args = train_args(tmp_path, name, config={"model": {"path": str(path), "from_scratch": None,
                                                            "train_tokenizer": None}}, recipe=recipe)
        assert main(args) == 0, capsys.readouterr().err
        assert (tmp_path / "runs" / name / "final" / "mtp_heads.safetensors").is_file()
    wrong = train_args(tmp_path, "wrong", config={"model": {"path": str(tmp_path / "release"), "from_scratch": None,
                                                            "train_tokenizer": None}},
                       recipe={"mtp": {"n_heads": 4}, "train": {"max_steps": 1}})
    assert main(wrong) == 1
    assert "Meta's checkpoint has 3 transformer heads" in capsys.readouterr().err
