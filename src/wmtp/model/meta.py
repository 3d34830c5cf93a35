"""Import Meta's released multi-token prediction checkpoints (facebook/multi-token-prediction, e.g. 7B_1T_4).

Layout: `params.json` (dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier,
norm_eps, rope_theta, n_future_tokens), `consolidated.pth` (or model-parallel shards `consolidated.00.pth`,
`consolidated.01.pth`, ...) with Llama-format `layers.*` (the trunk plus head 0, `n_layers - n_future_tokens + 1`
blocks) and `extra_heads.*` (heads 1…n-1), `tok_embeddings`, `norm`, `output`, and the SentencePiece
`tokenizer.model`. Meta's rotary embedding rotates adjacent pairs (complex form); Hugging Face's rotates the two
halves of each head, so the rows of wq and wk are permuted as in transformers' own Llama conversion.

Model-parallel shards are merged as Meta's model-parallel layers split them: column-parallel weights (wq, wk, wv,
w1, w3, output) along their output rows, row-parallel ones (wo, w2) and the parallel embedding along their
columns; norms are replicated. `wmtp convert-meta DIR OUT` writes the Hugging Face form once; a config's
`model.path` may also name DIR directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .mtp import MTPConfig, MTPModel

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The feed-forward width Meta's Llama code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rotary_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary pairs to Hugging Face's rotate-half."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# Meta's model-parallel layers: which dimension each weight is split along across consolidated.NN.pth shards.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                    "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def is_meta_checkpoint(path: str | os.PathLike) -> bool:
    """A directory in the layout of Meta's release: its params.json (the weights, consolidated*.pth, are read when
    the model is built; a params.json alone is enough to plan)."""
    return (Path(path) / "params.json").is_file()


def read_consolidated(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, model-parallel shards merged (memory-mapped; one copy of the merged weights)."""
    files = sorted(directory.glob("consolidated*.pth"))
    if not files:
        raise FileNotFoundError(f"{directory}: no consolidated*.pth (the weights of Meta's release)")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    if len(shards) == 1:
        return shards[0]
    keys = shards[0].keys()
    for f, shard in zip(files[1:], shards[1:], strict=True):
        if shard.keys() != keys:
            raise ValueError(f"{f}: holds other tensors than {files[0].name}; not shards of one checkpoint")
    merged = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        if key.endswith(_COLUMN_PARALLEL):
            merged[key] = torch.cat(parts, dim=0)
        elif key.endswith(_ROW_PARALLEL):
            merged[key] = torch.cat(parts, dim=1)
        else:  # replicated (norms)
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"{directory}: `{key}` differs between shards but is not a split weight")
            merged[key] = parts[0]
    return merged


def convert_sentencepiece(model_file: Path):
    """A Hugging Face fast tokenizer from a Llama-style SentencePiece `tokenizer.model`, checked to give the ids
    SentencePiece itself gives on probe strings (SentencePiece always adds its dummy-prefix `▁`, which the
    converter's default pre-tokenizer skips before a leading space: the legacy normalizer is kept)."""
    import tempfile

    import sentencepiece
    from tokenizers import decoders, normalizers
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    for probe in ("def f(x):\n    return x + 1\n", "  indented\tand\n\nlines", " leading", "ünïcødé 文字 🙂",
                  "Hello, world!"):
        expected, got = processor.encode(probe), tokenizer(probe, add_special_tokens=False)["input_ids"]
        if expected != got:
            raise ValueError(f"{model_file}: the converted tokenizer gives {got[:8]}… for {probe!r}, SentencePiece "
                             f"{expected[:8]}…; this SentencePiece model is not Llama-style")
    return tokenizer


def _read_params(directory: Path) -> dict:
    path = directory / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Meta checkpoint directory holds params.json and consolidated.pth")
    params = json.loads(path.read_text())
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "n_future_tokens"):
        if key not in params:
            raise ValueError(f"{path}: missing key `{key}`")
    return params


def meta_llama_config(directory: str | os.PathLike, max_position_embeddings: int = 4096) -> tuple[LlamaConfig, int]:
    """The Hugging Face Llama config of a Meta MTP checkpoint's shared part, and its n_future_tokens."""
    directory = Path(directory)
    params = _read_params(directory)
    n_future = int(params["n_future_tokens"])
    n_heads_attn = int(params["n_heads"])
    dim = int(params["dim"])
    n_blocks = int(params["n_layers"]) - n_future + 1
    if n_blocks < 1:
        raise ValueError(f"{directory / 'params.json'}: n_layers={params['n_layers']} is smaller than "
                         f"n_future_tokens={n_future}")
    config = LlamaConfig(
        vocab_size=int(params["vocab_size"]), hidden_size=dim, num_hidden_layers=n_blocks,
        intermediate_size=meta_ffn_hidden_dim(dim, int(params.get("multiple_of", 256)),
                                              params.get("ffn_dim_multiplier")),
        num_attention_heads=n_heads_attn, num_key_value_heads=int(params.get("n_kv_heads") or n_heads_attn),
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return config, n_future


def load_meta_mtp_checkpoint(directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                             max_position_embeddings: int = 4096) -> MTPModel:
    """An `MTPModel` (transformer heads) holding the weights of a Meta MTP checkpoint directory."""
    directory = Path(directory)
    config, n_future = meta_llama_config(directory, max_position_embeddings)
    n_heads_attn, n_kv = config.num_attention_heads, config.num_key_value_heads
    n_blocks = config.num_hidden_layers
    weights_path = directory / "consolidated*.pth"
    state = read_consolidated(directory)

    def block(prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for meta_key, hf_key in _LAYER_KEYS.items():
            key = f"{prefix}.{meta_key}"
            if key not in state:
                raise ValueError(f"{weights_path}: missing tensor `{key}`")
            tensor = state[key]
            if meta_key == "attention.wq.weight":
                tensor = rotary_permute(tensor, n_heads_attn)
            elif meta_key == "attention.wk.weight":
                tensor = rotary_permute(tensor, n_kv)
            out[hf_key] = tensor.to(dtype)
        return out

    hf_state = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"].to(dtype),
        "model.norm.weight": state["norm.weight"].to(dtype),
        "lm_head.weight": state["output.weight"].to(dtype),
    }
    for i in range(n_blocks):
        hf_state.update({f"model.layers.{i}.{k}": v for k, v in block(f"layers.{i}").items()})
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base.load_state_dict(hf_state, strict=True, assign=True)
    base.model.rotary_emb = type(base.model.rotary_emb)(config=config)  # buffers are not in the state dict
    base.eval()
    mtp_config = MTPConfig(n_heads=n_future, head_type="transformer")
    heads = MTPModel._new_heads(base, mtp_config)
    for k, head in enumerate(heads):
        head.load_state_dict(block(f"extra_heads.{k}"), strict=True)
    extra = {key.split(".")[1] for key in state if key.startswith("extra_heads.")}
    if len(extra) != n_future - 1:
        raise ValueError(f"{weights_path}: {len(extra)} extra heads for n_future_tokens={n_future}")
    return MTPModel(base, nn.ModuleList(heads), mtp_config)
