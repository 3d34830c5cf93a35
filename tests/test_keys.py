"""Every config and recipe key that is accepted changes behaviour, and a check here proves it for each one.

`leaf_keys()` lists every leaf key of the `Config` and `Recipe` schemas (`config.compute.seed`,
`recipe.data.train[].kind`, ...). `KEY_CHECKS` maps each of them to a check that sets the key to two values
and observes a difference, so a new key without a check fails `test_every_key_has_a_check`. Checks call the
function the trainer calls with that key where they can (`lr_lambda`, `make_optimizer`, `plan_steps`,
`build_model`, `prepare`, `load_examples`); keys that act inside the loop use a few steps of a real `Trainer`,
and `output_dir` and `compute.device` go through the CLI.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers.critic_key_checks import CRITIC_KEY_CHECKS, check_incorrect_solutions
from helpers.dpace_key_checks import DPACE_KEY_CHECKS
from helpers.gradnorm_key_checks import GRADNORM_KEY_CHECKS
from helpers.grpo_key_checks import GRPO_KEY_CHECKS
from helpers.hybrid_key_checks import HYBRID_KEY_CHECKS
from helpers.models import tiny_llama
from helpers.scoring_checks import check_scoring
from helpers.tiny_run import CONFIG, RECIPE, SNIPPETS, merge
from pydantic import BaseModel, ValidationError

import wmtp.model.mtp
import wmtp.runtime.distributed
from wmtp.cli import main
from wmtp.components.optim import lr_lambda, make_optimizer
from wmtp.config import (
    Config,
    ConfigError,
    DataSettings,
    ModelSource,
    Recipe,
    ScratchModel,
    Tracking,
    Training,
    load_config,
)
from wmtp.data.sequences import labels_for, train_bpe_tokenizer
from wmtp.data.sources import load_examples
from wmtp.data.steps import plan_steps
from wmtp.model.build import build_model
from wmtp.model.mtp import ResidualHead, SequentialDepth
from wmtp.model.parallelize import blocks
from wmtp.runtime.distributed import DistInfo, init_distributed, resolve_device
from wmtp.runtime.tracking import tracking_uri
from wmtp.training.build import prepare
from wmtp.training.trainer import Trainer
from wmtp.weighting import SCHEMES, config_schemas, plugin
from wmtp.weighting.base import WeightingScheme
from wmtp.weighting.reference import score_reference_set
from wmtp.weighting.rho1.cache import fingerprint, write_cache
from wmtp.weighting.rho1.scheme import Rho1Weighting
from wmtp.weighting.uniform import UniformWeighting

MBPP = Path(__file__).resolve().parents[1] / "data" / "mbpp"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SCRATCH = CONFIG["model"]["from_scratch"]  # hidden 32, 2 layers, 4 heads, 2 kv heads, mlp 64, 128 positions


# ------------------------------------------------------------------------------------------- the key list
def _nested(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model an annotation holds, whether it is a list of them); (None, False) for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        inner, _ = _nested(args[0])
        return (inner, True) if inner is not None else (None, False)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _nested(arg)
            if found[0] is not None:
                return found
    return None, False


def leaf_keys(schema: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Every leaf key path of the schemas: nested models recursed, list items as `[]`, dicts as one leaf."""
    if schema is None:  # the recipe's own sections and those of every weighting scheme
        schemes = set().union(*(leaf_keys(plugin(name).settings, "recipe") for name in SCHEMES),
                              *(leaf_keys(schema, "config") for schema in config_schemas().values()))
        return leaf_keys(Config, "config") | leaf_keys(Recipe, "recipe") | schemes
    keys: set[str] = set()
    for name, field in schema.model_fields.items():
        model, is_list = _nested(field.annotation)
        path = f"{prefix}.{name}"
        keys |= {path} if model is None else leaf_keys(model, path + ("[]" if is_list else ""))
    return keys


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is fastest, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Shared:
    """Files built once per module: a prompt/completion corpus, two tokenizers, and an MLflow store on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        texts = [(f"# task {i}\n", s) for i, s in enumerate(SNIPPETS)]
        self.corpus = root / "snippets.jsonl"
        self.corpus.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in texts))
        self.other = root / "other.jsonl"
        self.other.write_text("".join(json.dumps({"text": f"x{i} = {i}\n"}) + "\n" for i in range(30)))
        self.fields = root / "fields.jsonl"
        self.fields.write_text("".join(json.dumps({"text": f"t{i}", "body": f"b{i}"}) + "\n" for i in range(10)))
        self.tokenizer = train_bpe_tokenizer([p + c for p, c in texts], 300, 2)
        self.tok300, self.tok400 = root / "tok300", root / "tok400"
        self.tokenizer.save_pretrained(self.tok300)
        train_bpe_tokenizer([p + c for p, c in texts], 400, 2).save_pretrained(self.tok400)
        self.datasets = {"snippets": str(self.corpus), "other": str(self.other), "fields": str(self.fields),
                         "mbpp": str(MBPP), "mbpp_train": str(MBPP / "train.json")}
        self._store: str | None = None

    def mlflow_store(self) -> str:
        """A sqlite store whose experiments keep their artifacts under the module's directory."""
        if self._store is None:
            from mlflow import MlflowClient

            uri = f"sqlite:///{self.root / 'mlflow.db'}"
            client = MlflowClient(uri)
            for name in ("keys", "keys-a", "keys-b"):
                client.create_experiment(name, artifact_location=(self.root / "artifacts" / name).as_uri())
            self._store = uri
        return self._store


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("keys"))


@dataclass
class Kit:
    """What a check gets: the shared files, its own temp dir, monkeypatch and capsys, and builders."""

    shared: Shared
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture

    def raw_config(self, model: dict | None = None, **overrides) -> dict:
        base = merge(CONFIG, {"output_dir": str(self.tmp / "runs"), "datasets": self.shared.datasets})
        base["model"] = model if model is not None else {"from_scratch": SCRATCH, "tokenizer": str(self.shared.tok300)}
        return merge(base, overrides)

    def raw_recipe(self, **overrides) -> dict:
        return merge(RECIPE, overrides)

    def config(self, model: dict | None = None, **overrides) -> Config:
        return Config.model_validate(self.raw_config(model, **overrides))

    def recipe(self, **overrides) -> Recipe:
        return Recipe.model_validate(self.raw_recipe(**overrides))

    def prepare(self, config: Config | None = None, recipe: Recipe | None = None):
        return prepare(config or self.config(), recipe or self.recipe(), CPU)

    def trainer(self, config: dict | None = None, recipe: dict | None = None, name: str = "run",
                info: DistInfo = CPU) -> Trainer:
        setup = prepare(self.config(**(config or {})), self.recipe(**(recipe or {})), info)
        return Trainer(setup, self.tmp / "runs" / name, run_name=name)

    def cli(self, config: dict, recipe: dict | None = None, *extra: str) -> int:
        config_path, recipe_path = self.tmp / "config.yaml", self.tmp / "recipe.yaml"
        config_path.write_text(yaml.safe_dump(config))
        recipe_path.write_text(yaml.safe_dump(self.raw_recipe(**(recipe or {}))))
        return main(["train", "--config", str(config_path), "--recipe", str(recipe_path), "--run-name", "run", *extra])

    def saved_llama(self, seed: int, name: str | None = None, tokenizer: Path | None = None) -> Path:
        """A plain Hugging Face Llama directory with a tokenizer (default: the 300-token one) next to it."""
        directory = self.tmp / (name or f"llama{seed}")
        if not directory.exists():
            tiny_llama(seed, vocab=512).save_pretrained(directory)
            transformers.AutoTokenizer.from_pretrained(tokenizer or self.shared.tok300).save_pretrained(directory)
        return directory

    def rho1_trainer(self, rho1: dict | None = None, reference: dict | None = None, **config) -> Trainer:
        """A Rho-1 trainer against a saved tiny Llama reference (same tokenizer as the trained model)."""
        reference = {"path": str(self.saved_llama(5, "reference")), **(reference or {})}
        return self.trainer(config={"reference_model": reference, **config},
                            recipe={"algorithm": "rho1", "rho1": rho1 or {}})


@pytest.fixture
def kit(shared, tmp_path, monkeypatch, capsys) -> Kit:
    return Kit(shared, tmp_path, monkeypatch, capsys)


def record_logs(trainer: Trainer) -> list[tuple[int, dict]]:
    """Every (step, metrics) the trainer logs, passed on to its tracker."""
    logged: list[tuple[int, dict]] = []
    original = trainer.tracker.log_metrics

    def log_metrics(metrics, step):
        logged.append((step, dict(metrics)))
        original(metrics, step)

    trainer.tracker.log_metrics = log_metrics
    return logged


def steps_logging(trainer: Trainer, metric: str) -> list[int]:
    """Run the trainer to the end; the steps at which it logged `metric`."""
    logs = record_logs(trainer)
    trainer.run()
    return [step for step, metrics in logs if metric in metrics]


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(trainer: Trainer) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (trainer.run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------- config.model
def check_model_path(kit: Kit) -> None:
    """`model.path` is the model that is loaded: its weights, not fresh ones."""
    for seed in (0, 1):
        directory = kit.saved_llama(seed)
        setup = kit.prepare(kit.config(model={"path": str(directory)}))
        want = transformers.AutoModelForCausalLM.from_pretrained(directory).state_dict()
        assert weights_equal(setup.model.base.state_dict(), want)
    assert not weights_equal(*(transformers.AutoModelForCausalLM.from_pretrained(kit.tmp / f"llama{s}").state_dict()
                               for s in (0, 1)))


def check_model_tokenizer(kit: Kit) -> None:
    """`model.tokenizer` is the tokenizer that is loaded, instead of the one next to the model."""
    directory = kit.saved_llama(0)
    default = kit.prepare(kit.config(model={"path": str(directory)}))
    other = kit.prepare(kit.config(model={"path": str(directory), "tokenizer": str(kit.shared.tok400)}))
    assert default.tokenizer.get_vocab() == kit.shared.tokenizer.get_vocab()
    assert other.tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(kit.shared.tok400).get_vocab()
    assert not torch.equal(default.train_set.input_ids, other.train_set.input_ids)
    scratch = kit.prepare(kit.config(model={"from_scratch": SCRATCH, "tokenizer": str(kit.shared.tok400)}))
    assert scratch.model.unembedding.weight.shape[0] == len(other.tokenizer) != len(default.tokenizer)


def scratch_model(kit: Kit, **fields) -> wmtp.MTPModel:
    source = ModelSource(from_scratch=ScratchModel(**{**SCRATCH, **fields}), tokenizer="given")
    return build_model(source, kit.recipe().mtp, kit.shared.tokenizer)


def check_hidden_size(kit: Kit) -> None:
    """`from_scratch.hidden_size` is the width of the model."""
    assert scratch_model(kit).base.get_input_embeddings().weight.shape[1] == 32
    assert scratch_model(kit, hidden_size=48).base.get_input_embeddings().weight.shape[1] == 48


def check_num_layers(kit: Kit) -> None:
    """`from_scratch.num_layers` is the number of decoder layers of the base model."""
    assert len(scratch_model(kit).base.model.layers) == 2
    assert len(scratch_model(kit, num_layers=3).base.model.layers) == 3


def check_num_attention_heads(kit: Kit) -> None:
    """`from_scratch.num_attention_heads` sets the head size (width / heads), hence the key projection's size."""
    def k_rows(model):
        return model.base.model.layers[0].self_attn.k_proj.weight.shape[0]

    assert k_rows(scratch_model(kit)) == 2 * 32 // 4
    assert k_rows(scratch_model(kit, num_attention_heads=2)) == 2 * 32 // 2


def check_num_key_value_heads(kit: Kit) -> None:
    """`from_scratch.num_key_value_heads` is the number of key/value heads (grouped-query attention)."""
    def k_rows(model):
        return model.base.model.layers[0].self_attn.k_proj.weight.shape[0]

    assert k_rows(scratch_model(kit)) == 2 * 8
    assert k_rows(scratch_model(kit, num_key_value_heads=1)) == 1 * 8


def check_intermediate_size(kit: Kit) -> None:
    """`from_scratch.intermediate_size` is the MLP width."""
    assert scratch_model(kit).base.model.layers[0].mlp.gate_proj.weight.shape[0] == 64
    assert scratch_model(kit, intermediate_size=80).base.model.layers[0].mlp.gate_proj.weight.shape[0] == 80


def check_max_position_embeddings(kit: Kit) -> None:
    """`from_scratch.max_position_embeddings` is the model's context length (config and rotary embedding)."""
    for value in (128, 64):
        model = scratch_model(kit, max_position_embeddings=value)
        assert model.config.max_position_embeddings == value
        assert model.base.model.rotary_emb.max_seq_len_cached == value


def check_tie_word_embeddings(kit: Kit) -> None:
    """`from_scratch.tie_word_embeddings` shares the embedding matrix with the unembedding, or not."""
    tied, untied = scratch_model(kit), scratch_model(kit, tie_word_embeddings=False)
    assert tied.unembedding.weight is tied.base.get_input_embeddings().weight
    assert untied.unembedding.weight is not untied.base.get_input_embeddings().weight


def trained_tokenizer(kit: Kit, **settings):
    model = {"from_scratch": SCRATCH, "train_tokenizer": {"vocab_size": 400, "min_frequency": 2, **settings}}
    setup = kit.prepare(kit.config(model=model))
    assert setup.model.unembedding.weight.shape[0] == len(setup.tokenizer)
    return setup.tokenizer


def check_tokenizer_vocab_size(kit: Kit) -> None:
    """`train_tokenizer.vocab_size` is the size of the trained tokenizer (and of the model's vocabulary)."""
    assert len(trained_tokenizer(kit, vocab_size=300)) == 300
    assert len(trained_tokenizer(kit, vocab_size=400)) == 400


def check_tokenizer_min_frequency(kit: Kit) -> None:
    """`train_tokenizer.min_frequency` drops rare merges: a high value gives a smaller vocabulary."""
    assert len(trained_tokenizer(kit, min_frequency=40)) < len(trained_tokenizer(kit, min_frequency=2))


def check_model_dtype(kit: Kit) -> None:
    """`model.dtype` is the dtype the weights are built or loaded in."""
    directory = kit.saved_llama(0)
    for dtype, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        scratch = kit.prepare(kit.config(model={"from_scratch": SCRATCH, "tokenizer": str(kit.shared.tok300),
                                                "dtype": dtype}))
        loaded = kit.prepare(kit.config(model={"path": str(directory), "dtype": dtype}))
        assert {p.dtype for p in scratch.model.parameters()} == {p.dtype for p in loaded.model.parameters()} == {want}


def check_hf_token(kit: Kit) -> None:
    """`model.hf_token` is sent to the hub when the model and its tokenizer are downloaded."""
    seen: list[tuple[str, str | None]] = []

    def model_from_pretrained(path, **kwargs):
        seen.append(("model", kwargs.get("token")))
        return tiny_llama(vocab=512)

    class Tokenizers:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(("tokenizer", kwargs.get("token")))
            return kit.shared.tokenizer

    kit.monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    kit.monkeypatch.setattr("wmtp.model.build.AutoTokenizer", Tokenizers)
    kit.prepare(kit.config(model={"path": "org/gated-model"}))
    assert seen == [("tokenizer", None), ("model", None)]
    seen.clear()
    kit.prepare(kit.config(model={"path": "org/gated-model", "hf_token": "hf_secret"}))
    assert seen == [("tokenizer", "hf_secret"), ("model", "hf_secret")]


# ------------------------------------------------------------------------------------------- config: rest
def check_datasets(kit: Kit) -> None:
    """`datasets` maps the names that data sources use to files."""
    settings = DataSettings(train=[{"kind": "jsonl", "dataset": "d"}], validation_fraction=0.0)
    a, _ = load_examples(settings, {"d": str(kit.shared.corpus)})
    b, _ = load_examples(settings, {"d": str(kit.shared.other)})
    assert a[0].completion == SNIPPETS[0] and b[0].completion == "x0 = 0\n"


def check_output_dir(kit: Kit) -> None:
    """`output_dir` is where a run's directory (checkpoints, final model) is written."""
    config = kit.raw_config(output_dir=str(kit.tmp / "elsewhere"))
    assert kit.cli(config, {"train": {"max_steps": 1}}) == 0
    assert (kit.tmp / "elsewhere" / "run" / "final" / "config.json").is_file()
    assert not (kit.tmp / "runs").exists()


def check_device(kit: Kit) -> None:
    """`compute.device` picks the device: cuda (mps) is refused without CUDA (MPS), auto takes CUDA when there is
    one, else MPS (tests/test_mps.py runs the MPS path where there is one)."""
    kit.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cpu", 1) == torch.device("cpu")
    kit.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kit.monkeypatch.setattr(wmtp.runtime.distributed, "mps_available", lambda: True)
    assert resolve_device("auto") == resolve_device("mps") == torch.device("mps")
    kit.monkeypatch.setattr(wmtp.runtime.distributed, "mps_available", lambda: False)
    assert kit.cli(kit.raw_config(compute={"device": "mps"}), None, "--dry-run") == 1
    assert "MPS is not available" in kit.capsys.readouterr().err
    assert kit.cli(kit.raw_config(compute={"device": "cpu"}), None, "--dry-run") == 0
    assert kit.cli(kit.raw_config(compute={"device": "cuda"}), None, "--dry-run") == 1
    assert "no CUDA device" in kit.capsys.readouterr().err


def check_precision(kit: Kit) -> None:
    """`compute.precision` is the autocast dtype of the forward (bf16 gives a different loss; fp16 needs CUDA)."""
    fp32 = kit.trainer().train_step()
    bf16_trainer = kit.trainer(config={"compute": {"precision": "bf16"}})
    bf16 = bf16_trainer.train_step()
    # at initialisation the loss is ~ln V either way, so compare the more sensitive gradient norm too
    assert math.isfinite(bf16["train/loss"]) and abs(bf16["train/loss"] - fp32["train/loss"]) < 0.1
    assert (bf16["train/loss"], bf16["train/grad_norm"]) != (fp32["train/loss"], fp32["train/grad_norm"])
    with bf16_trainer.autocast:
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        kit.prepare(kit.config(compute={"precision": "fp16"}))


def check_distributed(kit: Kit) -> None:
    """`compute.distributed` picks the wrapper under torchrun: DistributedDataParallel or FSDP2's fully_shard."""
    calls: list[str] = []
    kit.monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                            lambda model, **_: calls.append("ddp") or model)
    kit.monkeypatch.setattr(torch.distributed.fsdp, "fully_shard",
                            lambda module, **_: calls.append(type(module).__name__) or module)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    kit.trainer(config={"compute": {"distributed": "ddp"}}, info=two)
    assert calls == ["ddp"]
    calls.clear()
    # FSDP2 fills its shards from rank 0 with collectives: a one-rank gloo group stands in for torchrun
    torch.distributed.init_process_group("gloo", init_method=f"file://{kit.tmp / 'pg-distributed'}", rank=0,
                                         world_size=1)
    try:
        kit.trainer(config={"compute": {"distributed": "fsdp2"}}, info=two)
    finally:
        torch.distributed.destroy_process_group()
    assert "ddp" not in calls and calls[-1] == "MTPModel" and len(calls) == 2 + 2 + 1  # layers, heads, root


def check_seed(kit: Kit) -> None:
    """`compute.seed` seeds the initial weights: the same seed gives the same model, another seed another."""
    def weights(seed):
        return kit.prepare(kit.config(compute={"seed": seed})).model.state_dict()

    assert weights_equal(weights(0), weights(0))
    assert not weights_equal(weights(0), weights(1))


def check_threads(kit: Kit) -> None:
    """`compute.threads` sets torch's CPU thread count."""
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            kit.prepare(kit.config(compute={"threads": threads}))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def check_every_steps(kit: Kit) -> None:
    """`checkpoint.every_steps` saves a checkpoint every N steps, besides the one at the end."""
    default = kit.trainer(name="a")
    default.run()
    every_two = kit.trainer(config={"checkpoint": {"every_steps": 2, "keep_last": 5}}, name="b")
    every_two.run()
    assert checkpoints(default) == [4] and checkpoints(every_two) == [2, 4]


def check_keep_last(kit: Kit) -> None:
    """`checkpoint.keep_last` is how many checkpoints are kept."""
    two = kit.trainer(config={"checkpoint": {"every_steps": 1}}, name="a")
    two.run()
    three = kit.trainer(config={"checkpoint": {"every_steps": 1, "keep_last": 3}}, name="b")
    three.run()
    assert checkpoints(two) == [3, 4] and checkpoints(three) == [2, 3, 4]


def check_max_shard_size(kit: Kit) -> None:
    """`checkpoint.max_shard_size` is the largest safetensors file of the final model."""
    def files(size):
        trainer = kit.trainer(config={"checkpoint": {"max_shard_size": size}}, name=f"shard{size}")
        trainer.run()
        return sorted(p.name for p in (trainer.run_dir / "final").glob("model*.safetensors"))

    assert files("5GB") == ["model.safetensors"]
    many = files("20KB")
    assert len(many) > 2 and many[0] == f"model-00001-of-{len(many):05d}.safetensors"
    with pytest.raises(ValidationError, match="expected a size"):
        kit.config(checkpoint={"max_shard_size": "lots"})


def check_timeout_minutes(kit: Kit) -> None:
    """`compute.timeout_minutes` is the process group's timeout for collectives."""
    seen = []
    kit.monkeypatch.setattr("torch.distributed.init_process_group", lambda *a, **k: seen.append(k["timeout"]))
    kit.monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    kit.monkeypatch.setenv("WORLD_SIZE", "2")
    for minutes in (30, 2.5):
        init_distributed("cpu", kit.config(compute={"timeout_minutes": minutes}).compute.timeout_minutes)
    assert seen == [datetime.timedelta(minutes=30), datetime.timedelta(minutes=2.5)]


def check_activation_checkpointing(kit: Kit) -> None:
    """`compute.activation_checkpointing` recomputes every block (all), every k-th block, or none; the step's
    loss is unchanged (tests/test_memory.py holds the gradients equal)."""
    def recomputed(setting):
        setup = kit.prepare(kit.config(compute={"activation_checkpointing": setting}))
        return [isinstance(block.forward, functools.partial) for block in blocks(setup.model)]

    assert not any(recomputed("none")) and all(recomputed("all"))
    assert recomputed(2) == [i % 2 == 0 for i in range(len(recomputed(2)))]
    losses = [kit.trainer(config={"compute": {"activation_checkpointing": s}}, name=f"ac{s}").train_step()
              ["train/loss"] for s in ("none", "all")]
    assert losses[0] == losses[1]


def fsdp_policy(kit: Kit, **fsdp):
    """The FSDP2 state of the first block after set-up with `compute.fsdp` (a one-rank gloo group stands in for
    torchrun; set-up shards as it would with two)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{kit.tmp / f'pg{len(fsdp)}{sorted(fsdp)}'}",
                                         rank=0, world_size=1)
    try:
        setup = prepare(kit.config(compute={"distributed": "fsdp2", "fsdp": fsdp}), kit.recipe(),
                        DistInfo(0, 2, 0, torch.device("cpu")))
        return blocks(setup.model)[0]._get_fsdp_state()
    finally:
        torch.distributed.destroy_process_group()


def check_fsdp_param_dtype(kit: Kit) -> None:
    """`compute.fsdp.param_dtype` is the dtype FSDP2 gathers parameters in."""
    assert fsdp_policy(kit)._mp_policy.param_dtype is None
    assert fsdp_policy(kit, param_dtype="bfloat16")._mp_policy.param_dtype == torch.bfloat16


def check_fsdp_reduce_dtype(kit: Kit) -> None:
    """`compute.fsdp.reduce_dtype` is the dtype FSDP2 reduces gradients in."""
    assert fsdp_policy(kit)._mp_policy.reduce_dtype is None
    assert fsdp_policy(kit, reduce_dtype="float32")._mp_policy.reduce_dtype == torch.float32


def check_fsdp_cpu_offload(kit: Kit) -> None:
    """`compute.fsdp.cpu_offload` keeps the shards in CPU memory; the key is refused without fsdp2."""
    policy = fsdp_policy(kit, cpu_offload=True)._fsdp_param_group.offload_policy
    assert type(policy).__name__ == "CPUOffloadPolicy"
    assert type(fsdp_policy(kit)._fsdp_param_group.offload_policy).__name__ == "OffloadPolicy"
    with pytest.raises(ValidationError, match="only applies to distributed: fsdp2"):
        kit.config(compute={"fsdp": {"cpu_offload": True}})


def tracked(kit: Kit, backends: list[str] | None = None, **mlflow) -> dict:
    settings = {"enabled": True, "tracking_uri": kit.shared.mlflow_store(), "experiment": "keys",
                "log_model": False, **mlflow}
    config = {"mlflow": settings, **({"tracking": {"backends": backends}} if backends is not None else {})}
    return kit.trainer(config=config, recipe={"train": {"max_steps": 1}}, name="tracked").run()


def check_mlflow_enabled(kit: Kit) -> None:
    """`mlflow.enabled` starts an MLflow run, or tracks nothing."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    experiment = client.get_experiment_by_name("keys").experiment_id
    before = len(client.search_runs([experiment]))
    assert tracked(kit, enabled=False)["mlflow_run_id"] is None
    assert len(client.search_runs([experiment])) == before
    run_id = tracked(kit)["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["train/loss"] > 0


def check_tracking_backends(kit: Kit) -> None:
    """`tracking.backends` names the trackers: tensorboard alone writes event files in the run directory and starts
    no MLflow run (mlflow.enabled left true); mlflow alone writes no event files; an unknown name is a one-line
    error naming the key, and tensorboard without its package one naming the key and the pip command."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    experiment = client.get_experiment_by_name("keys").experiment_id
    before = len(client.search_runs([experiment]))
    result = tracked(kit, backends=["tensorboard"])
    run_dir = kit.tmp / "runs" / "tracked"
    assert result["mlflow_run_id"] is None and len(client.search_runs([experiment])) == before
    assert result["tensorboard_dir"] == str(run_dir / "tensorboard")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    import shutil

    shutil.rmtree(run_dir)
    result = tracked(kit, backends=["mlflow"])
    assert result["mlflow_run_id"] is not None and result["tensorboard_dir"] is None
    assert not (run_dir / "tensorboard").exists()
    path = kit.tmp / "config.yaml"
    path.write_text(yaml.safe_dump(kit.raw_config(tracking={"backends": ["mlflow", "wandb"]})))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: tracking.backends.1: ") and "'tensorboard'" in str(error.value)
    assert "\n" not in str(error.value)
    kit.monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the package imports
    with pytest.raises(ConfigError, match=r"^config: tracking.backends: tensorboard needs the tensorboard package: "
                       r"pip install tensorboard$"):
        kit.prepare(kit.config(tracking={"backends": ["tensorboard"]}))


def check_tracking_uri(kit: Kit) -> None:
    """`mlflow.tracking_uri` is the store the run is written to (default: a sqlite file under output_dir)."""
    from mlflow import MlflowClient

    result = tracked(kit)
    assert result["tracking_uri"] == kit.shared.mlflow_store()
    assert MlflowClient(kit.shared.mlflow_store()).get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    assert not (kit.tmp / "runs" / "mlflow.db").exists()
    assert tracking_uri(Tracking(), kit.tmp) == f"sqlite:///{kit.tmp.resolve() / 'mlflow.db'}"


def check_experiment(kit: Kit) -> None:
    """`mlflow.experiment` is the experiment the run belongs to."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    for name in ("keys-a", "keys-b"):
        run = client.get_run(tracked(kit, experiment=name)["mlflow_run_id"])
        assert client.get_experiment(run.info.experiment_id).name == name


def check_log_model(kit: Kit) -> None:
    """`mlflow.log_model` uploads the final model directory as the run's `model` artifact, or not."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    with_model = client.list_artifacts(tracked(kit, log_model=True)["mlflow_run_id"])
    without = client.list_artifacts(tracked(kit, log_model=False)["mlflow_run_id"])
    assert "model" in [a.path for a in with_model] and "model" not in [a.path for a in without]


def check_log_model_max_size(kit: Kit) -> None:
    """`mlflow.log_model_max_size`: a final model above it is not uploaded to MLflow; a tag says where it is."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    capped = tracked(kit, log_model=True, log_model_max_size="1KB")["mlflow_run_id"]
    kept = tracked(kit, log_model=True, log_model_max_size="1GB")["mlflow_run_id"]
    assert "model" not in [a.path for a in client.list_artifacts(capped)]
    assert client.get_run(capped).data.tags["wmtp.model_location"].endswith("final")
    assert "model" in [a.path for a in client.list_artifacts(kept)]
    assert "wmtp.model_not_logged" not in client.get_run(kept).data.tags


def check_artifact_location(kit: Kit) -> None:
    """`mlflow.artifact_location` is where a new experiment keeps its artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(kit.shared.mlflow_store())
    for name in ("here", "there"):
        location = kit.tmp / f"artifacts-{name}"
        run = client.get_run(tracked(kit, experiment=f"keys-{name}", artifact_location=location.as_uri())
                             ["mlflow_run_id"])
        assert run.info.artifact_uri.startswith(location.as_uri())


# ------------------------------------------------------------------------------------------- config.storage
def remote_run(kit: Kit, name: str, **storage) -> int:
    """A run whose output_dir is fsspec's in-memory store (what a storage URL does, without a server)."""
    import fsspec

    fsspec.filesystem("memory").mkdir(f"/wmtp-keys-{name}")
    config = kit.raw_config(output_dir=f"memory://wmtp-keys-{name}/runs", storage=storage,
                            checkpoint={"every_steps": 2})
    return kit.cli(config, {"train": {"max_steps": 4}})


def check_staging_dir(kit: Kit) -> None:
    """`storage.staging_dir` is where a run with a remote output_dir is written before its upload."""
    import fsspec

    assert remote_run(kit, "stage-a", staging_dir=str(kit.tmp / "stage-a")) == 0
    assert remote_run(kit, "stage-b", staging_dir=str(kit.tmp / "stage-b")) == 0
    for name in ("stage-a", "stage-b"):
        assert len(list((kit.tmp / name).glob("*/run/final/config.json"))) == 1
        assert fsspec.filesystem("memory").exists(f"/wmtp-keys-{name}/runs/run/final/_COMPLETE.json")


def flaky_uploads(kit: Kit, failures: int) -> list[float]:
    """Make the next `failures` uploads fail; returns the list the mirror's backoff sleeps are recorded in."""
    import fsspec.implementations.memory

    import wmtp.runtime.mirror

    left = [failures]
    original = fsspec.implementations.memory.MemoryFileSystem.put_file

    def put_file(self, *args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise ConnectionError("the store is unreachable")
        return original(self, *args, **kwargs)

    sleeps: list[float] = []
    kit.monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "put_file", put_file)
    kit.monkeypatch.setattr(wmtp.runtime.mirror.time, "sleep", sleeps.append)
    return sleeps


def check_upload_retries(kit: Kit) -> None:
    """`storage.upload_retries`: a failed upload is tried again that many times before the run stops."""
    flaky_uploads(kit, 2)
    assert remote_run(kit, "retry-ok", upload_retries=2, staging_dir=str(kit.tmp / "s1")) == 0
    flaky_uploads(kit, 2)
    assert remote_run(kit, "retry-fail", upload_retries=1, staging_dir=str(kit.tmp / "s2")) == 1
    err = kit.capsys.readouterr().err
    assert "failed after 2 tries: cannot reach the store (the store is unreachable)" in err


def check_retry_backoff_seconds(kit: Kit) -> None:
    """`storage.retry_backoff_seconds` is the wait before the first retry, doubled for each next one."""
    sleeps = flaky_uploads(kit, 2)
    assert remote_run(kit, "backoff", upload_retries=3, retry_backoff_seconds=0.25,
                      staging_dir=str(kit.tmp / "s3")) == 0
    assert sleeps == [0.25, 0.5] or sorted(sleeps) == [0.25, 0.25]  # one file twice, or two files once each


def check_log_every(kit: Kit) -> None:
    """`logging.log_every` is the number of steps between training-metric logs (and the last step is logged)."""
    def logged_steps(every):
        return steps_logging(kit.trainer(config={"logging": {"log_every": every}}, name=f"every{every}"), "train/loss")

    assert logged_steps(1) == [1, 2, 3, 4] and logged_steps(3) == [3, 4]


def check_progress(kit: Kit) -> None:
    """`logging.progress` shows a progress bar on a terminal, or else one plain line per logged step (a log file,
    where stderr is no terminal, gets the lines either way: tests/test_first_hour.py)."""
    kit.monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: True, raising=False)
    kit.trainer(config={"logging": {"progress": False}}, name="plain").run()
    plain = kit.capsys.readouterr().err
    kit.trainer(config={"logging": {"progress": True}}, name="bar").run()
    bar = kit.capsys.readouterr().err
    assert "step 4/4 loss" in plain and "4/4 [" not in plain
    assert "4/4 [" in bar and "step 4/4 loss" not in bar


# ------------------------------------------------------------------------------------------- recipe: model, loss
def check_algorithm(kit: Kit) -> None:
    """`algorithm` picks the weighting scheme: uniform weights (baseline-mtp) or Rho-1 excess-loss weights."""
    assert type(kit.trainer().scheme) is UniformWeighting
    assert type(kit.rho1_trainer().scheme) is Rho1Weighting
    with pytest.raises(ConfigError, match="algorithm: unknown `not-a-scheme`"):
        kit.prepare(recipe=kit.recipe(algorithm="not-a-scheme"))


def check_n_heads(kit: Kit) -> None:
    """`mtp.n_heads` is the number of output heads, hence of label columns per position."""
    for n in (1, 3):
        setup = kit.prepare(recipe=kit.recipe(mtp={"n_heads": n}))
        batch = setup.train_set.select(torch.arange(2))
        assert setup.model.n_heads == n and len(setup.model.heads) == n - 1
        assert labels_for(batch, setup.model.n_heads, False).shape[-1] == n


def check_head_type(kit: Kit) -> None:
    """`mtp.head_type` is the kind of extra head: a decoder layer, a residual MLP, or a sequential MTP module."""
    transformer = kit.prepare(recipe=kit.recipe(mtp={"head_type": "transformer"})).model
    linear = kit.prepare(recipe=kit.recipe(mtp={"head_type": "linear"})).model
    sequential = kit.prepare(recipe=kit.recipe(mtp={"head_type": "sequential"})).model
    assert type(transformer.heads[0]) is type(transformer.base.model.layers[-1])
    assert all(isinstance(h, ResidualHead) for h in linear.heads)
    assert all(isinstance(h, SequentialDepth) and type(h.mtp_block) is type(sequential.base.model.layers[-1])
               for h in sequential.heads)


def check_head_coef(kit: Kit) -> None:
    """`mtp.head_coef` weights the heads in the loss: [1, 0, 0] trains on head 0's cross-entropy alone."""
    uniform = kit.trainer().train_step()
    head0 = kit.trainer(recipe={"mtp": {"head_coef": [1.0, 0.0, 0.0]}}).train_step()
    assert head0["train/loss"] == pytest.approx(head0["train/ce_head0"], rel=1e-5)
    assert uniform["train/loss"] != pytest.approx(uniform["train/ce_head0"], rel=1e-3)


def check_head_coef_rule(kit: Kit) -> None:
    """`mtp.head_coef_rule` sets λ_h by a convention: the step it trains is bit for bit the step of the same
    coefficients written out as `mtp.head_coef`, and the rules differ from one another (meta is today's default)."""
    def step(mtp: dict, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        trainer = kit.trainer(recipe={"mtp": mtp}, name=name)
        metrics = trainer.train_step()
        return metrics, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    rule, rule_weights = step({"head_coef_rule": "deepseek", "head_coef_scale": 0.3}, "deepseek")
    explicit, explicit_weights = step({"head_coef": [1.0, 0.15, 0.15]}, "explicit")
    assert rule["train/loss"] == explicit["train/loss"] and weights_equal(rule_weights, explicit_weights)
    meta, meta_weights = step({"head_coef_rule": "meta"}, "meta")
    default, default_weights = step({}, "default")
    assert meta["train/loss"] == default["train/loss"] and weights_equal(meta_weights, default_weights)
    assert meta["train/loss"] != pytest.approx(rule["train/loss"], rel=1e-4)
    with pytest.raises(ValidationError, match="`head_coef` .* or `head_coef_rule`, not both"):
        kit.recipe(mtp={"head_coef_rule": "deepseek", "head_coef": [1.0, 0.15, 0.15]})


def check_head_coef_scale(kit: Kit) -> None:
    """`mtp.head_coef_scale` is DeepSeek's λ: 0 leaves head 0's cross-entropy alone in the loss; 0.3 does not. It is
    an error without the deepseek rule."""
    none = kit.trainer(recipe={"mtp": {"head_coef_rule": "deepseek", "head_coef_scale": 0.0}}, name="zero")
    assert none.recipe.mtp.coefficients == [1.0, 0.0, 0.0]
    zero = none.train_step()
    some = kit.trainer(recipe={"mtp": {"head_coef_rule": "deepseek", "head_coef_scale": 0.3}}, name="some").train_step()
    assert zero["train/loss"] == pytest.approx(zero["train/ce_head0"], rel=1e-5)
    assert some["train/loss"] != pytest.approx(some["train/ce_head0"], rel=1e-3)
    with pytest.raises(ValidationError, match="`head_coef_scale` applies to head_coef_rule: deepseek only"):
        kit.recipe(mtp={"head_coef_scale": 0.3})


def check_head_coef_decay(kit: Kit) -> None:
    """`mtp.head_coef_decay` is the geometric rule's γ: head k weighs γ^k, so γ = 1 trains Meta's all-ones step and
    γ = 0.5 another. It is an error without the geometric rule."""
    flat = kit.trainer(recipe={"mtp": {"head_coef_rule": "geometric", "head_coef_decay": 1.0}}, name="flat")
    decayed = kit.trainer(recipe={"mtp": {"head_coef_rule": "geometric", "head_coef_decay": 0.5}}, name="half")
    assert decayed.recipe.mtp.coefficients == [1.0, 0.5, 0.25]
    flat_step, decayed_step = flat.train_step(), decayed.train_step()
    meta = kit.trainer(name="meta").train_step()
    assert flat_step["train/loss"] == meta["train/loss"]
    assert decayed_step["train/loss"] != pytest.approx(meta["train/loss"], rel=1e-4)
    with pytest.raises(ValidationError, match="`head_coef_decay` applies to head_coef_rule: geometric only"):
        kit.recipe(mtp={"head_coef_rule": "deepseek", "head_coef_decay": 0.8})


def check_trainable(kit: Kit) -> None:
    """`mtp.trainable: heads` trains heads 1…n-1 alone: the base model (head 0) is bit for bit unchanged after
    steps, the heads move, and the optimizer holds the heads' parameters only; `all` moves the base model too."""
    frozen = kit.trainer(recipe={"mtp": {"trainable": "heads"}})
    base_before = {k: v.clone() for k, v in frozen.model.base.state_dict().items()}
    heads_before = {k: v.clone() for k, v in frozen.model.heads.state_dict().items()}
    frozen.train_step()
    frozen.train_step()
    assert all(torch.equal(v, base_before[k]) for k, v in frozen.model.base.state_dict().items())
    assert any(not torch.equal(v, heads_before[k]) for k, v in frozen.model.heads.state_dict().items())
    in_optimizer = {id(p) for group in frozen.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in frozen.model.heads.parameters()}
    full = kit.trainer(recipe={"mtp": {"trainable": "all"}}, name="full")
    before = {k: v.clone() for k, v in full.model.base.state_dict().items()}
    full.train_step()
    assert any(not torch.equal(v, before[k]) for k, v in full.model.base.state_dict().items())
    with pytest.raises(ValidationError, match="trainable: heads needs extra heads"):
        kit.recipe(mtp={"n_heads": 1, "trainable": "heads"})


class RandomWeights(WeightingScheme):
    """Non-uniform positive weights, the same on every call with the same batches."""

    def step_weights(self, batches):
        g = torch.Generator().manual_seed(0)
        return [torch.rand(b.labels.shape, generator=g) + 0.5 for b in batches]


def check_reduction(kit: Kit) -> None:
    """`loss.reduction` is the loss normaliser: the pair count (token_mean) or the weight sum (weight_mean)."""
    losses = {}
    for reduction in ("token_mean", "weight_mean"):
        trainer = kit.trainer(recipe={"loss": {"reduction": reduction}})
        trainer.scheme = RandomWeights()
        metrics = trainer.train_step()
        losses[reduction] = metrics["train/loss"]
    mean_weight = metrics["weights/mean"]
    assert mean_weight != pytest.approx(1.0, abs=1e-3)
    assert losses["token_mean"] == pytest.approx(losses["weight_mean"] * mean_weight, rel=1e-5)


def check_chunk_size(kit: Kit) -> None:
    """`loss.chunk_size` reaches the fused cross-entropy in training and validation (results do not change)."""
    seen: list[int] = []
    original = wmtp.model.mtp.fused_linear_mtp_ce

    def fused(*args, chunk_size, **kwargs):
        seen.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    kit.monkeypatch.setattr(wmtp.model.mtp, "fused_linear_mtp_ce", fused)
    losses = {}
    for chunk in (1024, 7):
        seen.clear()
        trainer = kit.trainer(recipe={"loss": {"chunk_size": chunk}})
        losses[chunk] = trainer.train_step()["train/loss"]
        trainer.evaluate()
        assert seen and set(seen) == {chunk}
    assert losses[7] == pytest.approx(losses[1024], rel=1e-5)


# ------------------------------------------------------------------------------------------- recipe.data
def source_examples(kit: Kit, where: str, **source):
    """The examples of one source standing in `data.<where>` (the other list is a fixed jsonl source)."""
    fixed = {"kind": "jsonl", "dataset": "snippets"}
    data = {"train": [fixed], "validation": [fixed], where: [source]}
    train, validation = load_examples(DataSettings(**data), kit.shared.datasets)
    return train if where == "train" else validation


def check_source_kind(kit: Kit, where: str) -> None:
    """`kind` picks the reader: the same MBPP file read as mbpp (prompt + code) or as plain jsonl text."""
    mbpp = source_examples(kit, where, kind="mbpp", dataset="mbpp_train")
    jsonl = source_examples(kit, where, kind="jsonl", dataset="mbpp_train")
    assert len(mbpp) == len(jsonl) == 374
    assert mbpp[0].prompt.startswith('"""\n') and mbpp[0].completion.startswith("class Pair")
    assert jsonl[0].prompt == "" and jsonl[0].completion.startswith("Write a function")


def check_source_dataset(kit: Kit, where: str) -> None:
    """`dataset` names the file a source reads."""
    a = source_examples(kit, where, kind="jsonl", dataset="snippets")
    b = source_examples(kit, where, kind="jsonl", dataset="other")
    assert (len(a), a[0].completion) == (len(SNIPPETS), SNIPPETS[0]) and (len(b), b[0].completion) == (30, "x0 = 0\n")


def check_source_split(kit: Kit, where: str) -> None:
    """`split` picks the split file of a dataset directory."""
    train = source_examples(kit, where, kind="mbpp", dataset="mbpp", split="train")
    test = source_examples(kit, where, kind="mbpp", dataset="mbpp", split="test")
    assert len(train) == 374 and len(test) == 500 and train[0].key != test[0].key


def check_source_limit(kit: Kit, where: str) -> None:
    """`limit` caps the number of records read from a source."""
    assert len(source_examples(kit, where, kind="jsonl", dataset="other")) == 30
    assert len(source_examples(kit, where, kind="jsonl", dataset="other", limit=4)) == 4


def check_source_text_field(kit: Kit, where: str) -> None:
    """`text_field` is the jsonl field that holds the text."""
    text = source_examples(kit, where, kind="jsonl", dataset="fields")
    body = source_examples(kit, where, kind="jsonl", dataset="fields", text_field="body")
    assert text[0].completion == "t0" and body[0].completion == "b0"


def check_validation_fraction(kit: Kit) -> None:
    """`data.validation_fraction` is the share of the training examples held out for validation."""
    def held_out(fraction):
        settings = DataSettings(train=[{"kind": "mbpp", "dataset": "mbpp"}], validation_fraction=fraction)
        return len(load_examples(settings, kit.shared.datasets)[1])

    assert held_out(0.0) == 0 and 10 < held_out(0.1) < held_out(0.3) < 374


def check_max_length(kit: Kit) -> None:
    """`data.max_length` is the number of tokens per training sequence."""
    for length in (32, 16):
        setup = kit.prepare(recipe=kit.recipe(data={"max_length": length}))
        assert setup.train_set.input_ids.shape[1] == setup.val_set.input_ids.shape[1] == length


def check_packing(kit: Kit) -> None:
    """`data.packing` packs documents into full rows, or puts each document in its own padded row."""
    packed = kit.prepare(recipe=kit.recipe(data={"packing": True, "max_length": 128}))
    padded = kit.prepare(recipe=kit.recipe(data={"packing": False, "max_length": 128}))
    assert len(padded.train_set) == len(padded.data.train_examples) > len(packed.train_set)
    assert int(packed.train_set.document_ids[0].max()) > 0  # a packed row holds several documents
    assert bool(packed.train_set.attention_mask[:-1].all()) and not bool(padded.train_set.attention_mask.all())
    assert bool((padded.train_set.document_ids[:, 0] == torch.arange(len(padded.train_set))).all())


def check_mask_prompt(kit: Kit) -> None:
    """`data.mask_prompt` excludes prompt tokens as targets, in the trainer's labels."""
    def targets(mask):
        trainer = kit.trainer(recipe={"data": {"mask_prompt": mask}})
        return int((trainer.step_batches()[0].labels != -100).sum())

    assert 0 < targets(True) < targets(False)


def check_shuffle_seed(kit: Kit) -> None:
    """`data.shuffle_seed` sets the document order of the sequences and the order of the sequences per epoch."""
    seed0, seed1 = (kit.prepare(recipe=kit.recipe(data={"shuffle_seed": s})) for s in (0, 1))
    assert not torch.equal(seed0.train_set.input_ids, seed1.train_set.input_ids)
    same_data = replace(seed0, plan=seed1.plan)
    first = Trainer(seed0, kit.tmp / "a", run_name="a").step_batches()[0].input_ids
    second = Trainer(same_data, kit.tmp / "b", run_name="b").step_batches()[0].input_ids
    assert not torch.equal(first, second)


# ------------------------------------------------------------------------------------------- recipe.optim, schedule
def optimizer(kit: Kit, **optim) -> torch.optim.Optimizer:
    return make_optimizer(torch.nn.Linear(4, 4), kit.recipe(optim=optim).optim)


def check_lr(kit: Kit) -> None:
    """`optim.lr` is the optimizer's learning rate."""
    assert {g["lr"] for g in optimizer(kit, lr=1e-3).param_groups} == {1e-3}
    assert {g["lr"] for g in optimizer(kit, lr=5e-4).param_groups} == {5e-4}


def check_weight_decay(kit: Kit) -> None:
    """`optim.weight_decay` is the decay of the matrices (vectors never decay)."""
    assert [g["weight_decay"] for g in optimizer(kit, weight_decay=0.1).param_groups] == [0.1, 0.0]
    assert [g["weight_decay"] for g in optimizer(kit, weight_decay=0.3).param_groups] == [0.3, 0.0]


def check_betas(kit: Kit) -> None:
    """`optim.betas` are AdamW's moment decay rates."""
    assert {g["betas"] for g in optimizer(kit, betas=(0.9, 0.95)).param_groups} == {(0.9, 0.95)}
    assert {g["betas"] for g in optimizer(kit, betas=(0.8, 0.99)).param_groups} == {(0.8, 0.99)}


def check_eps(kit: Kit) -> None:
    """`optim.eps` is AdamW's epsilon."""
    assert {g["eps"] for g in optimizer(kit, eps=1e-8).param_groups} == {1e-8}
    assert {g["eps"] for g in optimizer(kit, eps=1e-6).param_groups} == {1e-6}


def check_grad_clip(kit: Kit) -> None:
    """`optim.grad_clip` caps the global gradient norm; null leaves gradients as they are."""
    def norm_after_clip(clip):
        trainer = kit.trainer(recipe={"optim": {"grad_clip": clip}})
        for p in trainer.model.parameters():
            p.grad = torch.ones_like(p)
        before = trainer.clip_gradients()
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
        return before, float(after)

    before, after = norm_after_clip(0.5)
    assert before > 10 and after == pytest.approx(0.5, rel=1e-4)
    before, after = norm_after_clip(None)
    assert after == pytest.approx(before, rel=1e-5)


def factors(kit: Kit, total: int = 10, **schedule) -> list[float]:
    factor = lr_lambda(kit.recipe(schedule=schedule).schedule, total)
    return [factor(step) for step in range(total + 1)]


def check_schedule_kind(kit: Kit) -> None:
    """`schedule.kind` is the shape of the decay: cosine, linear or constant."""
    cosine = factors(kit, kind="cosine", warmup_steps=0)
    linear = factors(kit, kind="linear", warmup_steps=0)
    constant = factors(kit, kind="constant", warmup_steps=0)
    assert constant == [1.0] * 11
    assert linear[5] == pytest.approx(0.1 + 0.9 * 0.5) and cosine[2] == pytest.approx(0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * 0.2)))
    assert cosine[2] != pytest.approx(linear[2])


def check_warmup_steps(kit: Kit) -> None:
    """`schedule.warmup_steps` ramps the learning rate up linearly over its first steps."""
    assert factors(kit, warmup_steps=0)[0] == 1.0
    assert factors(kit, warmup_steps=4)[:4] == [0.25, 0.5, 0.75, 1.0]


def check_min_lr_ratio(kit: Kit) -> None:
    """`schedule.min_lr_ratio` is the final learning rate as a fraction of optim.lr."""
    assert factors(kit, warmup_steps=0, min_lr_ratio=0.1)[-1] == pytest.approx(0.1)
    assert factors(kit, warmup_steps=0, min_lr_ratio=0.5)[-1] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- recipe.train
def step_counts(n_sequences: int, train: Training) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) of the step plan."""
    plan = plan_steps(n_sequences, train, DataSettings(train=[{"kind": "jsonl", "dataset": "d"}]), 256, world_size=1)
    return plan.total_steps, plan.steps_per_epoch


def steps(**train) -> tuple[int, int]:
    return step_counts(100, Training(**{"max_steps": 1000, "micro_batch_size": 4, **train}))


def check_micro_batch_size(kit: Kit) -> None:
    """`train.micro_batch_size` is the number of sequences per micro-batch (hence steps per epoch)."""
    assert steps(micro_batch_size=4)[1] == 25 and steps(micro_batch_size=8)[1] == 12
    for size in (4, 2):
        trainer = kit.trainer(recipe={"train": {"micro_batch_size": size}})
        assert trainer.step_batches()[0].input_ids.shape[0] == size


def check_grad_accum_steps(kit: Kit) -> None:
    """`train.grad_accum_steps` is the number of micro-batches (forwards) per optimizer step."""
    assert steps(micro_batch_size=4, grad_accum_steps=1)[1] == 25
    assert steps(micro_batch_size=4, grad_accum_steps=2)[1] == 12
    for accum in (1, 3):
        trainer = kit.trainer(recipe={"train": {"grad_accum_steps": accum, "micro_batch_size": 2}})
        forwards = count_forwards(trainer.model)
        trainer.train_step()
        assert len(forwards) == accum


def check_max_steps(kit: Kit) -> None:
    """`train.max_steps` is the number of optimizer steps (when fewer than num_epochs give)."""
    assert steps(max_steps=3)[0] == 3 and steps(max_steps=7)[0] == 7
    assert steps(max_steps=7, num_epochs=1)[0] == 7 and steps(max_steps=70, num_epochs=1)[0] == 25
    assert kit.trainer(recipe={"train": {"max_steps": 2}}).plan.total_steps == 2


def check_num_epochs(kit: Kit) -> None:
    """`train.num_epochs` is the training length in passes over the data."""
    def total(epochs):
        return step_counts(100, Training(micro_batch_size=4, num_epochs=epochs))[0]

    assert (total(1), total(2), total(0.5)) == (25, 50, 13)


def check_eval_every(kit: Kit) -> None:
    """`train.eval_every` is the number of steps between validations (default: once, at the end)."""
    def validated_at(every):
        return steps_logging(kit.trainer(recipe={"train": {"eval_every": every}}, name=f"eval{every}"), "val/loss")

    assert validated_at(None) == [4] and validated_at(2) == [2, 4] and validated_at(1) == [1, 2, 3, 4]


def check_eval_batches(kit: Kit) -> None:
    """`train.eval_batches` caps the number of validation micro-batches."""
    def forwards(cap):
        trainer = kit.trainer(recipe={"train": {"eval_batches": cap}})
        calls = count_forwards(trainer.model)
        trainer.evaluate()
        return len(calls)

    assert forwards(None) == 4 and forwards(1) == 1 and forwards(2) == 2  # 16 validation sequences, 4 per batch


def stops_at(kit: Kit, rule: dict, values: list[float], metric: str = "val/loss") -> int | None:
    """The evaluation (1-based) after which early stopping stops training, for a series of metric values."""
    trainer = kit.trainer(recipe={"train": {"eval_every": 1, "early_stopping": rule}})
    for i, value in enumerate(values, start=1):
        metrics = {"val/loss": 1.0, "val/acc_head0": 0.5, metric: value}
        if trainer.early_stopping.should_stop(metrics):
            return i
    return None


def check_early_stopping_metric(kit: Kit) -> None:
    """`early_stopping.metric` is the validation metric that must improve."""
    falling = [3.0, 2.0, 1.0, 0.5]
    assert stops_at(kit, {"metric": "val/loss", "patience": 1}, falling) is None
    assert stops_at(kit, {"metric": "val/acc_head0", "patience": 1}, falling) == 2  # acc stays flat
    with pytest.raises(ConfigError, match="not a validation metric"):
        stops_at(kit, {"metric": "val/nope"}, falling)


def check_early_stopping_mode(kit: Kit) -> None:
    """`early_stopping.mode` says whether lower (min) or higher (max) is better."""
    rising = [1.0, 2.0, 3.0, 4.0]
    assert stops_at(kit, {"mode": "min", "patience": 1}, rising) == 2
    assert stops_at(kit, {"mode": "max", "patience": 1}, rising) is None


def check_early_stopping_patience(kit: Kit) -> None:
    """`early_stopping.patience` is the number of evaluations without improvement before stopping."""
    flat = [1.0] * 6
    assert stops_at(kit, {"patience": 1}, flat) == 2 and stops_at(kit, {"patience": 3}, flat) == 4


def check_early_stopping_min_delta(kit: Kit) -> None:
    """`early_stopping.min_delta` is the smallest change that counts as an improvement."""
    creeping = [1.0, 0.99, 0.98, 0.97]
    assert stops_at(kit, {"patience": 1, "min_delta": 0.0}, creeping) is None
    assert stops_at(kit, {"patience": 1, "min_delta": 0.05}, creeping) == 2


# ------------------------------------------------------------------------------------------- Rho-1
def first_step_weights(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, valid) the trainer's scheme gives the first micro-batch, as a one-micro-batch step."""
    batch = trainer.step_batches()[0]
    return trainer.scheme.step_weights([batch])[0], batch.labels != -100


def rho1_weights(kit: Kit, **rho1) -> tuple[torch.Tensor, torch.Tensor]:
    return first_step_weights(kit.rho1_trainer(rho1))


def kept(weights: torch.Tensor, valid: torch.Tensor, head: int) -> float:
    """The fraction of head `head`'s valid pairs with a non-zero weight."""
    return float((weights[..., head][valid[..., head]] > 0).float().mean())


def check_rho1_mode(kit: Kit) -> None:
    """`rho1.mode` is how excess losses become weights: soft weights, or 0/1 selection (skip bottom, keep top)."""
    weighted, valid = rho1_weights(kit, mode="weighted")
    skip, _ = rho1_weights(kit, mode="token_skip")
    topk, _ = rho1_weights(kit, mode="topk")
    assert not set(weighted[valid].unique().tolist()) <= {0.0, 1.0}
    assert set(skip[valid].unique().tolist()) == set(topk[valid].unique().tolist()) == {0.0, 1.0}
    assert kept(skip, valid, 1) == pytest.approx(0.7, abs=0.02) and kept(topk, valid, 1) == pytest.approx(0.6, abs=0.02)


def check_rho1_temperature(kit: Kit) -> None:
    """`rho1.temperature` sharpens (low) or flattens (high) the weights exp(z / T)."""
    sharp, valid = rho1_weights(kit, temperature=0.5)
    flat, _ = rho1_weights(kit, temperature=5.0)
    assert flat[valid].std() < sharp[valid].std()


def check_rho1_eps(kit: Kit) -> None:
    """`rho1.eps` is the floor of the weights (mean1_clip, docs/method.md §4)."""
    low, valid = rho1_weights(kit, eps=0.0)
    high, _ = rho1_weights(kit, eps=0.5)
    assert float(high[valid].min()) > 0.3 > float(low[valid].min())


def check_rho1_w_max(kit: Kit) -> None:
    """`rho1.w_max` is the ceiling of the weights (mean1_clip, docs/method.md §4): no weight lies above it."""
    loose, valid = rho1_weights(kit, w_max=10.0)
    tight, _ = rho1_weights(kit, w_max=1.5)
    assert float(tight[valid].max()) <= 1.5 + 1e-6 < float(loose[valid].max())


def check_rho1_skip_fraction(kit: Kit) -> None:
    """`rho1.skip_fraction` is the share of each head's pairs that token_skip drops."""
    for fraction in (0.2, 0.6):
        weights, valid = rho1_weights(kit, mode="token_skip", skip_fraction=fraction)
        assert kept(weights, valid, 2) == pytest.approx(1 - fraction, abs=0.02)


def check_rho1_keep_fraction(kit: Kit) -> None:
    """`rho1.keep_fraction` is the share of each head's pairs that topk keeps."""
    for fraction in (0.3, 0.8):
        weights, valid = rho1_weights(kit, mode="topk", keep_fraction=fraction)
        assert kept(weights, valid, 2) == pytest.approx(fraction, abs=0.02)


def check_rho1_min_ce_diff(kit: Kit) -> None:
    """`rho1.min_ce_diff` excludes pairs whose excess loss is below it from selection."""
    every, valid = rho1_weights(kit, mode="topk", keep_fraction=1.0)
    none, _ = rho1_weights(kit, mode="topk", keep_fraction=1.0, min_ce_diff=1e9)
    assert kept(every, valid, 1) == 1.0 and kept(none, valid, 1) == 0.0


def check_rho1_train_head0_fully(kit: Kit) -> None:
    """`rho1.train_head0_fully` keeps weight 1 on every valid pair of head 0 (only heads 1... are re-weighted)."""
    reweighted, valid = rho1_weights(kit, mode="topk", keep_fraction=0.3)
    full, _ = rho1_weights(kit, mode="topk", keep_fraction=0.3, train_head0_fully=True)
    assert kept(reweighted, valid, 0) == pytest.approx(0.3, abs=0.02) and bool((full[..., 0][valid[..., 0]] == 1).all())
    assert kept(full, valid, 1) == pytest.approx(0.3, abs=0.02)


def check_rho1_scoring(kit: Kit) -> None:
    """`rho1.scoring`: see check_scoring."""
    reference = {"path": str(kit.saved_llama(5, "reference"))}

    def trainer_for(scoring: str, recipe: dict | None = None) -> Trainer:
        return kit.trainer(config={"reference_model": reference}, name=f"rho1-{scoring}",
                           recipe={"algorithm": "rho1", "rho1": {"scoring": scoring}, **(recipe or {})})

    check_scoring(kit, trainer_for)


def check_reference_path(kit: Kit) -> None:
    """`reference_model.path` is the reference that is loaded, and its scores change the Rho-1 weights."""
    weights = []
    for seed in (5, 6):
        directory = kit.saved_llama(seed)
        trainer = kit.rho1_trainer(reference={"path": str(directory)})
        want = transformers.AutoModelForCausalLM.from_pretrained(directory).state_dict()
        assert weights_equal(trainer.scheme.reference.state_dict(), want)
        weights.append(first_step_weights(trainer)[0])
    assert not torch.equal(*weights)


def check_reference_tokenizer(kit: Kit) -> None:
    """`reference_model.tokenizer` is the reference tokenizer checked against the trained model's."""
    directory = kit.saved_llama(5, "mismatched", tokenizer=kit.shared.tok400)
    with pytest.raises(ConfigError, match="reference_model: tokenizer has 400 tokens"):
        kit.rho1_trainer(reference={"path": str(directory)})
    trainer = kit.rho1_trainer(reference={"path": str(directory), "tokenizer": str(kit.shared.tok300)})
    assert trainer.scheme.reference is not None


def check_reference_dtype(kit: Kit) -> None:
    """`reference_model.dtype` is the dtype the reference is loaded in."""
    for dtype, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        trainer = kit.rho1_trainer(reference={"dtype": dtype})
        assert {p.dtype for p in trainer.scheme.reference.parameters()} == {want}


def check_reference_hf_token(kit: Kit) -> None:
    """`reference_model.hf_token` is sent to the hub when the reference and its tokenizer are downloaded."""
    seen: list[tuple[str, str | None]] = []

    def model_from_pretrained(path, **kwargs):
        seen.append((str(path), kwargs.get("token")))
        return tiny_llama(vocab=512)

    class Tokenizers:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append((str(path), kwargs.get("token")))
            return kit.shared.tokenizer

    kit.monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    kit.monkeypatch.setattr("wmtp.model.build.AutoTokenizer", Tokenizers)
    kit.rho1_trainer(reference={"path": "org/gated-reference"})
    assert [token for path, token in seen if path == "org/gated-reference"] == [None, None]
    seen.clear()
    kit.rho1_trainer(reference={"path": "org/gated-reference", "hf_token": "hf_ref"})
    assert [token for path, token in seen if path == "org/gated-reference"] == ["hf_ref", "hf_ref"]


def check_reference_cache(kit: Kit) -> None:
    """`reference_cache` replaces the reference's forward by the cached scores (the weights are not even loaded)."""
    online = kit.rho1_trainer()
    reference = online.setup.config.reference_model.path
    scores = score_reference_set(online.scheme.reference, online.setup.train_set, 4, online.autocast, CPU.device)
    key = fingerprint(online.setup.train_set, online.setup.tokenizer, reference)
    true_cache, zero_cache = kit.tmp / "true.safetensors", kit.tmp / "zero.safetensors"
    write_cache(true_cache, scores, key)
    write_cache(zero_cache, torch.zeros_like(scores), key)
    true, zero = (kit.rho1_trainer(reference_cache=str(path)) for path in (true_cache, zero_cache))
    assert online.scheme.reference is not None and true.scheme.reference is None
    weights, valid = first_step_weights(online)
    assert torch.allclose(first_step_weights(true)[0], weights, atol=1e-5)
    assert not torch.allclose(first_step_weights(zero)[0], weights, atol=1e-3)


def check_trunk_cache(kit: Kit) -> None:
    """`trunk_cache` replaces the trunk's forward by its cached states: a step from the cache runs no trunk layer
    and has the loss of a step through the trunk; a cache of zero states gives another loss."""
    from wmtp.training.trunk_cache import cache_states

    recipe = {"mtp": {"n_heads": 3, "trainable": "heads"}}
    through = kit.trainer(recipe=recipe, name="through")
    cache = cache_states(through.config, through.recipe, through.setup.data, through.model, kit.tmp / "states.st")
    cached = kit.trainer(config={"trunk_cache": str(cache)}, recipe=recipe, name="cached")
    layers = count_forwards(cached.model.base.base_model.layers[0])
    loss = through.train_step()["train/loss"]
    assert cached.train_step()["train/loss"] == pytest.approx(loss, rel=1e-6) and not layers
    header = 8 + int.from_bytes(cache.read_bytes()[:8], "little")
    data = cache.read_bytes()
    cache.write_bytes(data[:header] + bytes(len(data) - header))
    zeroed = kit.trainer(config={"trunk_cache": str(cache)}, recipe=recipe, name="zeroed")
    assert zeroed.train_step()["train/loss"] != pytest.approx(loss, rel=1e-3)


# ------------------------------------------------------------------------------------------- the registry
KEY_CHECKS: dict[str, Callable[[Kit], None]] = {
    "config.model.path": check_model_path,
    "config.model.tokenizer": check_model_tokenizer,
    "config.model.from_scratch.hidden_size": check_hidden_size,
    "config.model.from_scratch.num_layers": check_num_layers,
    "config.model.from_scratch.num_attention_heads": check_num_attention_heads,
    "config.model.from_scratch.num_key_value_heads": check_num_key_value_heads,
    "config.model.from_scratch.intermediate_size": check_intermediate_size,
    "config.model.from_scratch.max_position_embeddings": check_max_position_embeddings,
    "config.model.from_scratch.tie_word_embeddings": check_tie_word_embeddings,
    "config.model.train_tokenizer.vocab_size": check_tokenizer_vocab_size,
    "config.model.train_tokenizer.min_frequency": check_tokenizer_min_frequency,
    "config.model.dtype": check_model_dtype,
    "config.model.hf_token": check_hf_token,
    "config.reference_model.path": check_reference_path,
    "config.reference_model.tokenizer": check_reference_tokenizer,
    "config.reference_model.dtype": check_reference_dtype,
    "config.reference_model.hf_token": check_reference_hf_token,
    "config.reference_cache": check_reference_cache,
    "config.trunk_cache": check_trunk_cache,
    "config.datasets": check_datasets,
    "config.output_dir": check_output_dir,
    "config.compute.device": check_device,
    "config.compute.precision": check_precision,
    "config.compute.distributed": check_distributed,
    "config.compute.seed": check_seed,
    "config.compute.threads": check_threads,
    "config.checkpoint.every_steps": check_every_steps,
    "config.checkpoint.keep_last": check_keep_last,
    "config.checkpoint.max_shard_size": check_max_shard_size,
    "config.compute.timeout_minutes": check_timeout_minutes,
    "config.compute.activation_checkpointing": check_activation_checkpointing,
    "config.compute.fsdp.param_dtype": check_fsdp_param_dtype,
    "config.compute.fsdp.reduce_dtype": check_fsdp_reduce_dtype,
    "config.compute.fsdp.cpu_offload": check_fsdp_cpu_offload,
    "config.tracking.backends": check_tracking_backends,
    "config.mlflow.enabled": check_mlflow_enabled,
    "config.mlflow.tracking_uri": check_tracking_uri,
    "config.mlflow.experiment": check_experiment,
    "config.mlflow.log_model": check_log_model,
    "config.mlflow.log_model_max_size": check_log_model_max_size,
    "config.mlflow.artifact_location": check_artifact_location,
    "config.storage.staging_dir": check_staging_dir,
    "config.storage.upload_retries": check_upload_retries,
    "config.storage.retry_backoff_seconds": check_retry_backoff_seconds,
    "config.logging.log_every": check_log_every,
    "config.logging.progress": check_progress,
    "recipe.algorithm": check_algorithm,
    "recipe.rho1.mode": check_rho1_mode,
    "recipe.rho1.temperature": check_rho1_temperature,
    "recipe.rho1.eps": check_rho1_eps,
    "recipe.rho1.w_max": check_rho1_w_max,
    "recipe.rho1.skip_fraction": check_rho1_skip_fraction,
    "recipe.rho1.keep_fraction": check_rho1_keep_fraction,
    "recipe.rho1.min_ce_diff": check_rho1_min_ce_diff,
    "recipe.rho1.train_head0_fully": check_rho1_train_head0_fully,
    "recipe.rho1.scoring": check_rho1_scoring,
    "recipe.mtp.n_heads": check_n_heads,
    "recipe.mtp.head_type": check_head_type,
    "recipe.mtp.head_coef": check_head_coef,
    "recipe.mtp.head_coef_rule": check_head_coef_rule,
    "recipe.mtp.head_coef_scale": check_head_coef_scale,
    "recipe.mtp.head_coef_decay": check_head_coef_decay,
    "recipe.mtp.trainable": check_trainable,
    "recipe.loss.reduction": check_reduction,
    "recipe.loss.chunk_size": check_chunk_size,
    **{f"recipe.data.{where}[].{key}": partial(check, where=where)
       for where in ("train", "validation")
       for key, check in (("kind", check_source_kind), ("dataset", check_source_dataset),
                          ("split", check_source_split), ("limit", check_source_limit),
                          ("text_field", check_source_text_field),
                          ("incorrect_solutions", check_incorrect_solutions))},
    "recipe.data.validation_fraction": check_validation_fraction,
    "recipe.data.max_length": check_max_length,
    "recipe.data.packing": check_packing,
    "recipe.data.mask_prompt": check_mask_prompt,
    "recipe.data.shuffle_seed": check_shuffle_seed,
    "recipe.optim.lr": check_lr,
    "recipe.optim.weight_decay": check_weight_decay,
    "recipe.optim.betas": check_betas,
    "recipe.optim.eps": check_eps,
    "recipe.optim.grad_clip": check_grad_clip,
    "recipe.schedule.kind": check_schedule_kind,
    "recipe.schedule.warmup_steps": check_warmup_steps,
    "recipe.schedule.min_lr_ratio": check_min_lr_ratio,
    "recipe.train.micro_batch_size": check_micro_batch_size,
    "recipe.train.grad_accum_steps": check_grad_accum_steps,
    "recipe.train.max_steps": check_max_steps,
    "recipe.train.num_epochs": check_num_epochs,
    "recipe.train.eval_every": check_eval_every,
    "recipe.train.eval_batches": check_eval_batches,
    "recipe.train.early_stopping.metric": check_early_stopping_metric,
    "recipe.train.early_stopping.mode": check_early_stopping_mode,
    "recipe.train.early_stopping.patience": check_early_stopping_patience,
    "recipe.train.early_stopping.min_delta": check_early_stopping_min_delta,
    **CRITIC_KEY_CHECKS,
    **DPACE_KEY_CHECKS,
    **GRADNORM_KEY_CHECKS,
    **GRPO_KEY_CHECKS,
    **HYBRID_KEY_CHECKS,
}


def test_every_key_has_a_check():
    keys = leaf_keys()
    assert not keys - set(KEY_CHECKS), f"keys without a check in KEY_CHECKS: {sorted(keys - set(KEY_CHECKS))}"
    assert not set(KEY_CHECKS) - keys, f"checks for keys the schemas do not have: {sorted(set(KEY_CHECKS) - keys)}"


def test_leaf_keys_walks_nested_models_lists_and_dicts():
    keys = leaf_keys()
    assert {"config.datasets", "config.model.hf_token", "config.model.from_scratch.num_layers",
            "recipe.data.train[].kind", "recipe.data.validation[].limit", "recipe.optim.betas",
            "recipe.train.early_stopping.min_delta"} <= keys
    assert not {"config.model", "config.model.from_scratch", "recipe.data.train", "recipe.data.validation",
                "recipe.train.early_stopping"} & keys


@pytest.mark.parametrize("key", sorted(KEY_CHECKS))
def test_key_changes_behaviour(key, kit):
    KEY_CHECKS[key](kit)
