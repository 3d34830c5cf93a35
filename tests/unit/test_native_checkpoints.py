"""Checkpoints that ship their own MTP layers (model/native.py, docs/method.md §2.1): tiny random checkpoints written
here in each family's own layout (the base by transformers' save_pretrained, the MTP tensors by this file under the
family's names, the config key set). Each depth's logits are held to a plain implementation of the family's
equations written here (norms by formula, the concatenation order, the projection, the chained state; the block is
the family's decoder layer class loaded with the raw tensors by this file); then a few training steps, the
write-back (every native key, shape and config key; frozen tensors bit-identical, trained ones changed) and a reload.

DeepSeek-V3's and GLM-4.5's MTP layers are MoE layers here (first_k_dense_replace = 1 < L), as in the releases, so
the per-expert tensors on disk are fused into transformers 5's experts and split again on the way back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

from wmtp import MTPLoss, MTPModel, mtp_labels
from wmtp.config import ConfigError, ModelSource, MTPShape
from wmtp.model.build import build_model, load_model_as_is

V = 97
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1,
           first_k_dense_replace=1, n_shared_experts=1)


def deepseek():
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, **MOE))


def glm():
    return Glm4MoeForCausalLM(Glm4MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **MOE))


def qwen3_next():
    # the trunk's last layer is linear attention: the MTP block must get the last full-attention layer's arguments
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        max_position_embeddings=64))


def qwen3_5():
    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        max_position_embeddings=64))


def mimo():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


# family: (trunk, depths, count key, block class, block index(L, k), names(L, k), zero-centred norms, order, chain)
FAMILIES = {
    "deepseek_v3": (deepseek, 2, "num_nextn_predict_layers", DeepseekV3DecoderLayer, lambda L, k: L + k,
                    lambda L, k: {"root": f"model.layers.{L + k}.", "enorm": "enorm", "hnorm": "hnorm",
                                  "proj": "eh_proj", "norm": "shared_head.norm"}, False, "emb_first", "pre_norm"),
    "glm4_moe": (glm, 1, "num_nextn_predict_layers", Glm4MoeDecoderLayer, lambda L, k: L + k,
                 lambda L, k: {"root": f"model.layers.{L + k}.", "enorm": "enorm", "hnorm": "hnorm",
                               "proj": "eh_proj", "norm": "shared_head.norm"}, False, "emb_first", "pre_norm"),
    "qwen3_next": (qwen3_next, 1, "mtp_num_hidden_layers", Qwen3NextDecoderLayer, lambda L, k: 1,
                   lambda L, k: {"root": f"mtp.layers.{k}.", "enorm": "^mtp.pre_fc_norm_embedding",
                                 "hnorm": "^mtp.pre_fc_norm_hidden", "proj": "^mtp.fc", "norm": "^mtp.norm"},
                   True, "emb_first", "post_norm"),
    "qwen3_5": (qwen3_5, 1, "mtp_num_hidden_layers", Qwen3_5DecoderLayer, lambda L, k: 1,
                lambda L, k: {"root": f"mtp.layers.{k}.", "enorm": "^mtp.pre_fc_norm_embedding",
                              "hnorm": "^mtp.pre_fc_norm_hidden", "proj": "^mtp.fc", "norm": "^mtp.norm"},
                True, "emb_first", "post_norm"),
    "mimo": (mimo, 2, "num_nextn_predict_layers", Qwen2DecoderLayer, lambda L, k: L - 1,
             lambda L, k: {"root": f"model.mtp_layers.{k}.", "enorm": "token_layernorm",
                           "hnorm": "hidden_layernorm", "proj": "input_proj", "norm": "final_layernorm"},
             False, "hidden_first", "post_norm"),
}


def key(names: dict, part: str) -> str:
    name = names[part]
    return (name[1:] if name.startswith("^") else names["root"] + name) + ".weight"


def block_to_disk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors as the families' files keep them: routed experts one by one."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.gate_proj.weight"] = t[e, :half].clone()
                out[f"mlp.experts.{e}.up_proj.weight"] = t[e, half:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def block_from_disk(raw: dict[str, torch.Tensor], prefix: str, layer: torch.nn.Module) -> None:
    """Load a fresh decoder layer from the raw tensors under `prefix` (experts stacked here)."""
    own = {}
    for name, t in layer.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            own[name] = torch.stack([torch.cat([raw[f"{prefix}mlp.experts.{e}.gate_proj.weight"],
                                                raw[f"{prefix}mlp.experts.{e}.up_proj.weight"]])
                                     for e in range(t.shape[0])])
        elif name.endswith("mlp.experts.down_proj"):
            own[name] = torch.stack([raw[f"{prefix}mlp.experts.{e}.down_proj.weight"] for e in range(t.shape[0])])
        else:
            own[name] = raw[prefix + name]
    layer.load_state_dict(own, strict=True)


def write_checkpoint(family: str, directory: Path, *, sharded: bool) -> dict[str, torch.Tensor]:
    """A tiny checkpoint of `family` with its MTP tensors; returns those tensors (native name -> tensor)."""
    make, depths, count_key, block_cls, block_index, names_of, zero_centred, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    base = make().eval()
    base.save_pretrained(directory)
    config = base.config
    L = config.num_hidden_layers
    g = torch.Generator().manual_seed(1)
    mtp = {}
    for k in range(depths):
        names = names_of(L, k)
        layer = block_cls(config, block_index(L, k))
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        mtp.update({names["root"] + n: t for n, t in block_to_disk(layer.state_dict()).items()})
        d = config.hidden_size
        for part in ("enorm", "hnorm", "norm"):
            mtp[key(names, part)] = (0.0 if zero_centred else 1.0) + 0.2 * torch.randn(d, generator=g)
        mtp[key(names, "proj")] = torch.randn(d, 2 * d, generator=g) * 0.2
        if family in ("deepseek_v3", "glm4_moe"):
            mtp[names["root"] + "embed_tokens.weight"] = base.get_input_embeddings().weight.detach().clone()
            mtp[names["root"] + "shared_head.head.weight"] = base.get_output_embeddings().weight.detach().clone()
    if sharded:
        save_file(mtp, directory / "model-mtp.safetensors", metadata={"format": "pt"})
        keys = list(load_file(directory / "model.safetensors"))
        weight_map = {**dict.fromkeys(keys, "model.safetensors"), **dict.fromkeys(mtp, "model-mtp.safetensors")}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**load_file(directory / "model.safetensors"), **mtp}, directory / "model.safetensors",
                  metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg[count_key] = depths
    if family == "mimo":
        cfg["model_type"], cfg["architectures"] = "mimo", ["MiMoForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg))
    return mtp


def rms(x, w, eps, zero_centred):
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + w) if zero_centred else w)


def plain_logits(family: str, base, raw: dict[str, torch.Tensor], x, mask) -> list[torch.Tensor]:
    """Each depth's logits [B, S, V] from the family's equations on the raw tensors: h_0 the trunk's output after its
    final norm; u = W [norm_e(E x[t+k]) ; norm_h(h_{k-1})] (DeepSeek, GLM, Qwen3-Next) or [norm_h(h) ; norm_e(e)]
    (MiMo); h'_k = Block(u); logits = U norm_k(h'_k); the next depth reads h'_k (DeepSeek, GLM) or norm_k(h'_k)."""
    _, depths, _, block_cls, block_index, names_of, zc, order, chain = FAMILIES[family]
    config = base.config
    L, eps = config.num_hidden_layers, config.rms_norm_eps
    with torch.no_grad():
        h = base.model(input_ids=x, attention_mask=mask).last_hidden_state
        b, s = x.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        cos_sin = base.model.rotary_emb(h, positions)
        allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & mask.bool()[:, None, :]
        attn = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        out = []
        for k in range(1, depths + 1):
            names = names_of(L, k - 1)
            shifted, present = torch.zeros_like(x), torch.zeros_like(mask)
            shifted[:, : s - k], present[:, : s - k] = x[:, k:], mask[:, k:]
            e = rms(base.model.embed_tokens(shifted) * present.unsqueeze(-1), raw[key(names, "enorm")], eps, zc)
            hn = rms(h, raw[key(names, "hnorm")], eps, zc)
            u = torch.cat([e, hn] if order == "emb_first" else [hn, e], dim=-1) @ raw[key(names, "proj")].T
            layer = block_cls(config, block_index(L, k - 1)).eval()
            block_from_disk(raw, names["root"], layer)
            hk = layer(u, attention_mask=attn, position_embeddings=cos_sin, position_ids=positions)
            hk = hk[0] if isinstance(hk, tuple) else hk
            normed = rms(hk, raw[key(names, "norm")], eps, zc)
            out.append(base.lm_head(normed))
            h = normed if chain == "post_norm" else hk
    return out


def source(path: Path) -> ModelSource:
    return ModelSource(path=str(path), dtype="float32")


def disk_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118 (safe_open has no iter)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_train_write_back_and_reload(family, tmp_path):
    depths, count_key = FAMILIES[family][1], FAMILIES[family][2]
    ckpt = tmp_path / "ckpt"
    raw = write_checkpoint(family, ckpt, sharded=family in ("deepseek_v3", "qwen3_next"))
    original = disk_tensors(ckpt)
    model = build_model(source(ckpt), MTPShape(n_heads=depths + 1, head_type="sequential", trainable="heads"), None)
    assert model.mtp_config.native == family and len(model.heads) == depths
    x, mask = batch(V=V)
    valid = mtp_labels(x, depths + 1, attention_mask=mask) != -100
    with torch.no_grad():
        got = model.eval()(x, mask, return_logits=True).logits
    want = plain_logits(family, model.base, raw, x, mask)
    for k, logits in enumerate(want, start=1):
        torch.testing.assert_close(got[:, :, k][valid[:, :, k]], logits[valid[:, :, k]], rtol=1e-4, atol=1e-5,
                                   msg=f"depth {k}")
    as_is = load_model_as_is(source(ckpt))  # `wmtp eval` of the checkpoint evaluates its depths
    assert as_is.n_heads == depths + 1 and as_is.mtp_config.native == family

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = mtp_labels(x, depths + 1, attention_mask=mask)
    for _ in range(3):
        optimizer.zero_grad()
        model(x, mask, MTPLoss(labels, head_coef=[1.0] + [0.3] * depths)).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x, mask, return_logits=True).logits

    out = tmp_path / "final"
    model.save_pretrained(out, max_shard_size=20_000)  # several shards: the index lists the MTP tensors too
    saved = disk_tensors(out)
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert saved[name].shape == tensor.shape, name
        if name not in raw or name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            assert torch.equal(saved[name], tensor), name  # the frozen base and the depths' copies of it
    changed = [n for n in raw if not torch.equal(saved[n], raw[n])]
    names = FAMILIES[family][5](model.config.num_hidden_layers, 0)
    assert {key(names, "proj"), key(names, "enorm"), key(names, "hnorm"), key(names, "norm")} <= set(changed)
    assert any(n.startswith(names["root"] + "self_attn.") for n in changed)  # the block trained too
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert not (out / "mtp_heads.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config[count_key] == depths and config["wmtp"]["native"] == family
    assert config["model_type"] == json.loads((ckpt / "config.json").read_text())["model_type"]

    for reloaded in (MTPModel.from_pretrained(out), build_model(source(out), MTPShape(
            n_heads=depths + 1, head_type="sequential"), None)):
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(x, mask, return_logits=True).logits, trained)


@pytest.mark.parametrize("family", ["deepseek_v3", "mimo"])
def test_bad_checkpoints_are_one_line_errors_naming_file_and_key(family, tmp_path):
    depths = FAMILIES[family][1]
    ckpt = tmp_path / "ckpt"
    raw = write_checkpoint(family, ckpt, sharded=True)
    mtp_file = ckpt / "model-mtp.safetensors"
    shape = MTPShape(n_heads=depths + 1, head_type="sequential")

    def rewrite(tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, mtp_file)
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        weight_map = {k: v for k, v in index["weight_map"].items() if v != mtp_file.name}
        index["weight_map"] = {**weight_map, **dict.fromkeys(tensors, mtp_file.name)}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    def expect(pattern: str, shape: MTPShape = shape) -> None:
        with pytest.raises(ConfigError, match=pattern) as info:
            build_model(source(ckpt), shape, None)
        assert "\n" not in str(info.value)

    expect(f"{FAMILIES[family][2]}: the checkpoint has {depths} MTP depth", MTPShape(n_heads=depths + 2,
                                                                                     head_type="sequential"))
    expect("load as sequential heads; the recipe asks for transformer", MTPShape(n_heads=depths + 1))
    names = FAMILIES[family][5](2, 0)
    proj = key(names, "proj")
    rewrite({**raw, proj: torch.zeros(3, 3)})
    expect(rf"model-mtp\.safetensors: `{proj}` has shape \[3, 3\]")
    rewrite({k: v for k, v in raw.items() if k != proj})
    expect(rf"`{proj}` is missing")
    extra_name = names["root"] + "unexpected.weight"
    rewrite({**raw, extra_name: torch.zeros(2)})
    expect(rf"`{extra_name}` is not a tensor of the {depths} {family} MTP depth")
    save_file({k: v for k, v in raw.items() if k != proj}, mtp_file)  # the index still lists it
    expect(rf"index\.json: lists `{proj}` in model-mtp\.safetensors, which does not hold it")


def test_a_checkpoint_whose_config_key_is_0_gets_fresh_depths(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint("deepseek_v3", ckpt, sharded=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    model = build_model(source(ckpt), MTPShape(n_heads=2, head_type="sequential"), None)
    assert model.mtp_config.native is None
    w = model.heads[0].eh_proj.weight
    assert torch.equal(w[:, 32:], torch.eye(32))  # a fresh depth, [0 | I]


@pytest.mark.parametrize("family", ["qwen3_next", "deepseek_v3"])
def test_fresh_depths_input_norms_are_the_plain_normalisation_for_every_norm_class(family):
    """A fresh depth's input norms start as x / rms(x) (times R for hnorm after `scale_fresh_depths`), also where the
    family's RMSNorm applies its weight as 1 + w (Qwen3-Next): weight 1 there would be a scale of 2."""
    from wmtp.model.mtp import _reset_norm

    base = {"qwen3_next": qwen3_next, "deepseek_v3": deepseek}[family]()
    model = MTPModel.from_base(base, n_heads=2, head_type="sequential").eval()
    depth = model.heads[0]
    x = torch.randn(3, 32)
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    with torch.no_grad():
        assert torch.allclose(depth.enorm(x), plain, atol=1e-5)
        assert torch.allclose(depth.hnorm(x), plain, atol=1e-5)
        _reset_norm(depth.hnorm, 7.5)
        assert torch.allclose(depth.hnorm(x), 7.5 * plain, atol=1e-4)
