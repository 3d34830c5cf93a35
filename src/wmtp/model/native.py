"""Checkpoints that ship their own MTP layers (DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5, MiMo): where each family
keeps them, how its equations differ, and how they are read from and written back to the safetensors files.

transformers drops these tensors when it loads the base model (`_keys_to_ignore_on_load_unexpected`), so they are read
here with `safe_open`, only them, and loaded into `mtp.SequentialDepth` modules whose block is the family's own decoder
layer class. `LAYOUTS` is the one table of what differs per family (docs/method.md §2.1): the concatenation order, the
state the next depth reads (pre- or post-norm), the block's layer index and the tensor names. The trunk's norm class is
the family's own (copied from the trunk), so a zero-centred RMSNorm (Qwen3-Next, Qwen3.5: weight applied as 1 + w)
stays one. Routed experts are fused in transformers 5 (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj` [E, D, I])
and stored per expert on disk (`mlp.experts.{e}.{gate,up,down}_proj.weight`): `to_disk` and `from_disk` convert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from ..config import ConfigError

WEIGHTS_INDEX = "model.safetensors.index.json"
PARTS = ("enorm", "hnorm", "eh_proj", "norm", "mtp_block")
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


@dataclass(frozen=True)
class NativeLayout:
    """One family's MTP layers on disk and in their equations. Names are templates over i = L + k and k (depth k =
    0, 1, …; L = num_hidden_layers); `mtp_block` is the prefix of the decoder layer's own keys.

    embed_first: the concatenation is [enorm(emb) ; hnorm(h)] (else [hnorm(h) ; enorm(emb)]). chain_normed: the next
    depth reads the depth's state after its final norm (else before). block_after_trunk: the block is built with layer
    index L + k (DeepSeek's MoE rule reads it), else with the index of the trunk's last full-attention layer.
    copies: per-depth copies of the trunk's tensors (name template -> "embed" or "head"), equal to the trunk's on load,
    written from the trunk on save. max_depths: how many depths the layout can hold (Qwen3-Next's fc and norms are one
    set, shared by every layer of `mtp.layers`)."""

    family: str
    model_types: tuple[str, ...]
    count_key: str
    names: dict[str, str]
    owns: str  # a regular expression matching every MTP key of the file (group 1: the depth's index, when any)
    embed_first: bool
    chain_normed: bool
    block_after_trunk: bool = False
    copies: tuple[tuple[str, str], ...] = ()
    max_depths: int | None = None
    trunk: str | None = None  # a model_type transformers has no class for, loaded as this one

    def name(self, part: str, k: int, num_layers: int) -> str:
        return self.names[part].format(i=num_layers + k, k=k)


_DEEPSEEK_NAMES = {"enorm": "model.layers.{i}.enorm", "hnorm": "model.layers.{i}.hnorm",
                   "eh_proj": "model.layers.{i}.eh_proj", "norm": "model.layers.{i}.shared_head.norm",
                   "mtp_block": "model.layers.{i}"}
_DEEPSEEK_COPIES = (("model.layers.{i}.embed_tokens.weight", "embed"), ("model.layers.{i}.shared_head.head.weight",
                                                                        "head"))
_QWEN_NEXT_NAMES = {"enorm": "mtp.pre_fc_norm_embedding", "hnorm": "mtp.pre_fc_norm_hidden", "eh_proj": "mtp.fc",
                    "norm": "mtp.norm", "mtp_block": "mtp.layers.{k}"}

LAYOUTS = {layout.family: layout for layout in (
    # vLLM deepseek_mtp.py: cat([enorm(emb), hnorm(prev)]), the block, the pre-norm state returned (shared_head.norm in
    # compute_logits); transformers' DeepseekV3 drops `model.layers.61.*`
    NativeLayout("deepseek_v3", ("deepseek_v3",), "num_nextn_predict_layers", _DEEPSEEK_NAMES,
                 r"model\.layers\.(\d+)\.", embed_first=True, chain_normed=False, block_after_trunk=True,
                 copies=_DEEPSEEK_COPIES),
    # vLLM glm4_moe_mtp.py: as DeepSeek (enorm, hnorm, eh_proj, shared_head, the block at model.layers.{L+k})
    NativeLayout("glm4_moe", ("glm4_moe",), "num_nextn_predict_layers", _DEEPSEEK_NAMES, r"model\.layers\.(\d+)\.",
                 embed_first=True, chain_normed=False, block_after_trunk=True, copies=_DEEPSEEK_COPIES),
    # vLLM qwen3_next_mtp.py: cat([pre_fc_norm_embedding(emb), pre_fc_norm_hidden(h)]), fc, a full-attention layer,
    # then `norm`, and the normed state is what it returns (and so what the next step reads)
    NativeLayout("qwen3_next", ("qwen3_next",), "mtp_num_hidden_layers", _QWEN_NEXT_NAMES, r"mtp\.",
                 embed_first=True, chain_normed=True, max_depths=1),
    NativeLayout("qwen3_5", ("qwen3_5_text",), "mtp_num_hidden_layers", _QWEN_NEXT_NAMES, r"mtp\.",
                 embed_first=True, chain_normed=True, max_depths=1),
    # vLLM mimo_mtp.py: input_proj(cat([hidden_layernorm(prev), token_layernorm(emb)])), a Qwen2 layer, then
    # final_layernorm, which is what it returns
    NativeLayout("mimo", ("mimo", "qwen2"), "num_nextn_predict_layers",
                 {"enorm": "model.mtp_layers.{k}.token_layernorm", "hnorm": "model.mtp_layers.{k}.hidden_layernorm",
                  "eh_proj": "model.mtp_layers.{k}.input_proj", "norm": "model.mtp_layers.{k}.final_layernorm",
                  "mtp_block": "model.mtp_layers.{k}"},
                 r"model\.mtp_layers\.(\d+)\.", embed_first=False, chain_normed=True, trunk="qwen2"),
)}


# ---------------------------------------------------------------------------------------------------- detection
def read_config(directory: str | Path) -> dict | None:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def detect(directory: str | Path) -> tuple[NativeLayout, int] | None:
    """(layout, number of MTP depths the config declares) for a Hugging Face directory of a family in `LAYOUTS`
    whose config key is > 0 and whose files hold at least one of its MTP tensors; None otherwise (a plain causal LM:
    fresh heads, as for any other model). transformers writes `num_nextn_predict_layers: 1` for DeepSeek-V3 and
    GLM-4.5 by default, so the key alone does not say that a file carries the layers."""
    config = read_config(directory)
    if config is None:
        return None
    model_type = config.get("model_type")
    if model_type == "qwen3_5" and (config.get("text_config") or {}).get("mtp_num_hidden_layers"):
        raise ConfigError(f"{Path(directory) / 'config.json'}: Qwen3.5 with a nested text_config (the multimodal "
                          "checkpoint) is not supported for its MTP layers; give the text model (qwen3_5_text)")
    layout = next((lay for lay in LAYOUTS.values() if model_type in lay.model_types), None)
    if layout is None or not config.get(layout.count_key):
        return None
    num_layers = config["num_hidden_layers"]
    if not any(_is_mtp_key(layout, key, num_layers) for key in _file_keys(directory)):
        return None
    return layout, int(config[layout.count_key])


def _is_mtp_key(layout: NativeLayout, key: str, num_layers: int) -> bool:
    match = re.match(layout.owns, key)
    if match is None:
        return False
    return not layout.block_after_trunk or int(match.group(1)) >= num_layers


def _files(directory: str | Path) -> dict[str, list[str]]:
    """file name -> its tensor names (from the index when the checkpoint is sharded, else from every file's header)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        files: dict[str, list[str]] = {}
        for key, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(file, []).append(key)
        return files
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found[path.name] = list(_open(path).keys())
    return found


def _file_keys(directory: str | Path) -> Iterator[str]:
    for keys in _files(directory).values():
        yield from keys


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read the tensors ({str(exc).splitlines()[0]}); the file is damaged or "
                          "incomplete") from None


def read_mtp_tensors(directory: str | Path, layout: NativeLayout, num_layers: int) -> dict[str, tuple[torch.Tensor,
                                                                                                      str]]:
    """Every MTP tensor of the checkpoint: native name -> (tensor, the file it came from). Only these are read."""
    tensors = {}
    for file, keys in _files(directory).items():
        wanted = [key for key in keys if _is_mtp_key(layout, key, num_layers)]
        if not wanted:
            continue
        handle = _open(Path(directory) / file)
        held = set(handle.keys())
        for key in wanted:
            if key not in held:
                raise ConfigError(f"{Path(directory) / WEIGHTS_INDEX}: lists `{key}` in {file}, which does not hold "
                                  "it; the checkpoint is incomplete")
            tensors[key] = (handle.get_tensor(key), file)
    return tensors


# ------------------------------------------------------------------------------------------------ the modules
def load_trunk(directory: str | Path, layout: NativeLayout, dtype: torch.dtype | None) -> PreTrainedModel:
    """The base model of a family transformers has no class for (MiMo: a Qwen2 trunk, its MTP keys dropped)."""
    if layout.trunk != "qwen2":
        raise ValueError(f"no trunk loader for {layout.trunk}")
    config = Qwen2Config.from_dict({k: v for k, v in read_config(directory).items() if k != "model_type"})
    kwargs = {} if dtype is None else {"dtype": dtype}
    return Qwen2ForCausalLM.from_pretrained(str(directory), config=config, **kwargs)


def capture_index(config) -> int:
    """The trunk layer whose mask and rotary arguments the MTP block gets: the last full-attention layer (a hybrid
    trunk's last layer may be linear attention, whose mask is another)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return config.num_hidden_layers - 1
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    if not full:
        raise ConfigError(f"{config.model_type}: no full-attention layer in layer_types; the MTP block needs one")
    return full[-1]


def new_block(layout: NativeLayout, base: PreTrainedModel, layers: nn.ModuleList, k: int) -> nn.Module:
    """Depth k's decoder layer, the family's own class, with no storage yet (on the meta device: the checkpoint's
    tensors are assigned to it)."""
    config = base.config
    index = config.num_hidden_layers + k if layout.block_after_trunk else capture_index(config)
    with torch.device("meta"):
        return type(layers[capture_index(config)])(config, index)


def _expert_names(key: str) -> tuple[str, str] | None:
    for fused in (GATE_UP, DOWN):
        if key == fused or key.endswith("." + fused):
            return key[: len(key) - len(fused)], fused
    return None


def to_disk(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A module tensor under its on-disk name(s): fused routed experts split per expert (transformers 5's
    qwen2_moe conversion, reversed), anything else unchanged; copies, so that no two share storage (safetensors
    refuses that, and a depth's copy of the embedding is the trunk's own tensor)."""
    split = _expert_names(key)
    if split is None:
        return {key: tensor.clone()}
    prefix, fused = split
    out = {}
    for e in range(tensor.shape[0]):
        if fused == GATE_UP:
            gate, up = tensor[e].chunk(2, dim=0)
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.clone()
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.clone()
        else:
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = tensor[e].clone()
    return out


def depth_names(layout: NativeLayout, module_keys: list[str], k: int, num_layers: int) -> dict[str, str]:
    """A SequentialDepth's state-dict key -> its name on disk (fused experts keep their fused name)."""
    names = {}
    for key in module_keys:
        part, _, rest = key.partition(".")
        names[key] = f"{layout.name(part, k, num_layers)}.{rest}"
    return names


def load_depth(layout: NativeLayout, depth: nn.Module, k: int, num_layers: int,
               tensors: dict[str, tuple[torch.Tensor, str]], used: set[str], directory: Path, dtype: torch.dtype,
               device: torch.device) -> None:
    """Assign depth k's tensors from `tensors` (native name -> (tensor, file)) to `depth`, every module key found,
    every shape checked; the names it reads are added to `used`."""
    state = {}
    expected = depth.state_dict(keep_vars=True)
    for key, disk in depth_names(layout, list(expected), k, num_layers).items():
        want = tuple(expected[key].shape)
        split = _expert_names(disk)
        if split is None:
            tensor = _take(tensors, disk, want, used, directory, layout, k)
        else:
            prefix, fused = split
            experts = want[0]
            if fused == GATE_UP:
                half = (want[1] // 2, want[2])
                tensor = torch.stack([torch.cat([
                    _take(tensors, f"{prefix}mlp.experts.{e}.gate_proj.weight", half, used, directory, layout, k),
                    _take(tensors, f"{prefix}mlp.experts.{e}.up_proj.weight", half, used, directory, layout, k)])
                    for e in range(experts)])
            else:
                tensor = torch.stack([_take(tensors, f"{prefix}mlp.experts.{e}.down_proj.weight", want[1:], used,
                                            directory, layout, k) for e in range(experts)])
        state[key] = tensor.to(device=device, dtype=dtype)
    depth.load_state_dict(state, strict=True, assign=True)


def _take(tensors: dict[str, tuple[torch.Tensor, str]], name: str, shape: tuple[int, ...], used: set[str],
          directory: Path, layout: NativeLayout, k: int) -> torch.Tensor:
    if name not in tensors:
        raise ConfigError(f"{directory}: {layout.family} MTP depth {k + 1}: tensor `{name}` is missing from the "
                          "checkpoint's files")
    tensor, file = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise ConfigError(f"{directory / file}: `{name}` has shape {list(tensor.shape)}, the {layout.family} MTP "
                          f"layer needs {list(shape)}")
    used.add(name)
    return tensor


def check_copies(layout: NativeLayout, base: PreTrainedModel, k: int, num_layers: int,
                 tensors: dict[str, tuple[torch.Tensor, str]], used: set[str], directory: Path) -> None:
    """Depth k's copies of the embedding and the output head must equal the trunk's: wmtp shares one of each."""
    for template, what in layout.copies:
        name = template.format(i=num_layers + k, k=k)
        own = (base.get_input_embeddings() if what == "embed" else base.get_output_embeddings()).weight
        tensor = _take(tensors, name, tuple(own.shape), used, directory, layout, k)
        if not torch.equal(tensor.to(own.dtype), own.detach().cpu()):
            raise ConfigError(f"{directory / tensors[name][1]}: `{name}` differs from the trunk's "
                              f"{'input embedding' if what == 'embed' else 'output head'}; wmtp's MTP depths share "
                              "the trunk's, so a checkpoint with its own copy cannot be trained as it is")


def copies_to_disk(layout: NativeLayout, base: PreTrainedModel, k: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Depth k's copies of the trunk's embedding and output head, under their names (not yet gathered)."""
    return {template.format(i=num_layers + k, k=k): (base.get_input_embeddings() if what == "embed"
                                                     else base.get_output_embeddings()).weight
            for template, what in layout.copies}


def config_for_disk(layout: NativeLayout, config: dict, n_depths: int) -> dict:
    """The config.json the checkpoint had, as far as the MTP layers go: the family's key set to the depths written,
    and MiMo's own model_type and architecture (its trunk is loaded as Qwen2; vLLM finds its MTP by them)."""
    config = {**config, layout.count_key: n_depths}
    if layout.trunk == "qwen2":
        config["model_type"], config["architectures"] = "mimo", ["MiMoForCausalLM"]
    return config
