"""What training and evaluation both need to run a model: where models and tokenizers come from (hub ids,
directories, GGUF files, files inside installed packages), the dtypes they load in, and the forward's autocast.

It sits below `setup`, `train` and `evaluate`, and imports none of them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..config import ConfigError, ModelSource, MTPShape
from ..runtime.precision import DTYPES
from ..runtime.storage import is_remote, local_path
from . import native
from .meta import convert_sentencepiece, is_meta_checkpoint, load_meta_mtp_checkpoint
from .mtp import MTPModel, is_wmtp_model_dir, load_causal_lm

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name` as the Hugging Face hub spells repositories: no leading `/`, `.` or `~`, at most one
    `/`, no `..` or `--`, not a file name such as `*.gguf`."""
    return (bool(_HUB_ID.match(spec)) and ".." not in spec and "--" not in spec and len(spec) <= 96
            and not spec.lower().endswith((".gguf", ".safetensors", ".bin", ".pth", ".json")))


def resolve_model_path(spec: str, key: str = "model.path") -> str:
    """`pkg:<package>/<file>` → the file inside the installed package (found without importing it); a storage URL
    (`s3://...`) → its local copy (`storage.fetch`); an existing directory or file, or a string that looks like a
    hub id, is returned unchanged. Anything else is a path that does not exist: an error naming `key`."""
    if is_remote(spec) or spec.startswith("file://"):
        return local_path(spec, key)
    if spec.startswith("pkg:"):
        package, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"{key} {spec}: package `{package}` is not installed")
        path = Path(found.submodule_search_locations[0]) / rel
        if not path.exists():
            raise ConfigError(f"{key} {spec}: {path} does not exist")
        return str(path)
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    if looks_like_hub_id(spec):
        return spec
    raise ConfigError(f"{key}: {spec} does not exist (expected a directory, a GGUF file, pkg:<package>/<file>, a "
                      "storage URL, or a hub id such as org/name)")


def secret(value) -> str | None:
    """The text of an optional SecretStr; an empty one (e.g. an unset `${HF_TOKEN:-}`) is None."""
    return (value.get_secret_value() or None) if value is not None else None


def load_tokenizer_from(spec: str, token: str | None = None, key: str = "model.path"):
    """A tokenizer from a hub id, a directory, a GGUF file, or Meta's release (its SentencePiece tokenizer.model,
    converted); `key` names the config key `spec` came from in errors."""
    path = Path(resolve_model_path(spec, key))
    if is_meta_checkpoint(path):
        if not (path / "tokenizer.model").is_file():
            raise ConfigError(f"tokenizer {spec}: Meta's release has no tokenizer.model here; give model.tokenizer")
        return convert_sentencepiece(path / "tokenizer.model")
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), token=token)
    except OSError as exc:
        raise ConfigError(f"{key} {spec}: no tokenizer could be loaded: {str(exc).splitlines()[0]}") from exc


def check_tokenizer_fits(tokenizer, model: MTPModel, what: str) -> None:
    vocab = model.unembedding.weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")


def build_model(source: ModelSource, shape: MTPShape, tokenizer) -> MTPModel:
    """The MTP model of a config's `model` source with the recipe's head shape: from scratch (sized to the
    tokenizer), a saved wmtp model or Meta's release (their heads must match), or any causal LM with new heads."""
    try:
        return _build_model(source, shape, tokenizer).set_trainable(shape.trainable)
    except OSError as exc:  # missing files, no network, unknown hub id: name what was asked for
        raise ConfigError(f"model.path {source.path}: {str(exc).splitlines()[0]}") from exc


def _build_model(source: ModelSource, shape: MTPShape, tokenizer) -> MTPModel:
    if source.from_scratch is not None:
        s = source.from_scratch
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        return MTPModel.from_base(base.to(DTYPES[source.dtype]), n_heads=shape.n_heads, head_type=shape.head_type)
    return _load_pretrained(source, shape)


def _load_pretrained(source: ModelSource, shape: MTPShape | None) -> MTPModel:
    """`model.path`: Meta's release, a wmtp model or a checkpoint with its own MTP layers (DeepSeek-V3, GLM-4.5,
    Qwen3-Next, Qwen3.5, MiMo: `native.LAYOUTS`) with its own heads (which must match `shape` when one is given), any
    other causal LM with `shape`'s new heads (no shape: head 0 alone, the model as it is)."""
    path = resolve_model_path(source.path)
    dtype = DTYPES[source.dtype]
    if is_meta_checkpoint(path):
        model = load_meta_mtp_checkpoint(path, dtype=dtype)
        found = f"Meta's checkpoint has {model.n_heads} transformer heads (n_future_tokens)"
    elif is_wmtp_model_dir(path):
        model = MTPModel.from_pretrained(path, dtype=dtype)
        found = f"a wmtp model with {model.n_heads} {model.mtp_config.head_type} heads"
    elif (layers := native.detect(path)) is not None:
        layout, depths = layers
        if shape is not None and shape.head_type != "sequential":
            raise ConfigError(f"{path}: a {layout.family} checkpoint with {depths} MTP layer(s) ({layout.count_key}), "
                              f"which load as sequential heads; the recipe asks for {shape.head_type} heads")
        model = MTPModel.from_native(path, n_heads=None if shape is None else shape.n_heads, dtype=dtype,
                                     token=secret(source.hf_token))
        found = f"a {layout.family} checkpoint with {depths} MTP layer(s)"
    else:
        base = load_causal_lm(path, dtype=dtype, token=secret(source.hf_token))
        if shape is None:
            return MTPModel.from_base(base, n_heads=1)
        return MTPModel.from_base(base, n_heads=shape.n_heads, head_type=shape.head_type)
    if shape is not None and (model.n_heads, model.mtp_config.head_type) != (shape.n_heads, shape.head_type):
        raise ConfigError(f"{path}: {found}, the recipe asks for {shape.n_heads} {shape.head_type} heads")
    return model


def load_model_as_is(source: ModelSource) -> MTPModel:
    """A config's pretrained `model.path` as it is, for evaluation: a wmtp model or Meta's release with its own
    heads, any other causal LM with head 0 alone (n_heads 1: the unmodified model)."""
    if source.path is None:
        raise ConfigError("model.from_scratch: a model built from scratch has nothing to evaluate; give --checkpoint")
    try:
        return _load_pretrained(source, None)
    except OSError as exc:
        raise ConfigError(f"model.path {source.path}: {str(exc).splitlines()[0]}") from exc
