"""A weighting scheme owns its config keys and its commands (issue 21): Rho-1's `reference_model` /
`reference_cache` and `wmtp score-reference` are declared in torch-free modules of its package, the general
config and the CLI know no scheme, and every user-facing behaviour of those keys stays as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wmtp.cli import load_inputs, main
from wmtp.config import Config, ConfigError, dump_masked, flatten, load_config, resolved_yaml
from wmtp.weighting import COMMANDS, CONFIG_SECTIONS, checked_config, commands, frozen_model, scheme_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "wmtp"
RECIPE = "algorithm: rho1\ndata:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n"
LOADED = "import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def inputs(tmp_path: Path, config: str, *overrides: str):
    args = type("Args", (), {"config": write(tmp_path, "c.yaml", config), "recipe": write(tmp_path, "r.yaml", RECIPE),
                             "overrides": list(overrides)})
    return load_inputs(args)


def test_the_general_config_and_the_cli_know_no_scheme():
    assert not {"reference_model", "reference_cache"} & set(Config.model_fields)
    for module in ("config.py", "cli.py"):
        text = (PACKAGE / module).read_text()
        assert "ReferenceSource" not in text and "score_reference" not in text and "reference_cache" not in text
    assert CONFIG_SECTIONS == {"rho1": "rho1.settings"} and COMMANDS == {"score-reference": "rho1.command"}
    assert commands()["score-reference"].run.__module__ == "wmtp.weighting.rho1.command"


def test_rho1s_declarations_and_its_command_help_load_without_torch():
    code = ("import wmtp.weighting.rho1.settings, wmtp.weighting.rho1.command\nfrom wmtp.cli import main\n"
            "try:\n    main(['score-reference', '--help'])\nexcept SystemExit:\n    pass\n" + LOADED)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--recipe" in result.stdout and result.stdout.splitlines()[-1] == "[]"


def test_scheme_keys_are_validated_with_the_file_and_key_in_the_error(tmp_path):
    config, _ = inputs(tmp_path, "model:\n  path: x\nreference_model:\n  path: ref\n  dtype: bfloat16\n")
    assert config.reference_model.path == "ref" and config.reference_model.dtype == "bfloat16"
    assert scheme_config(config, "rho1").reference_cache is None
    path = tmp_path / "c.yaml"
    for body, message in [("reference_model:\n  path: ref\n  bogus: 1\n", "reference_model.bogus: unknown key"),
                          ("reference_model:\n  tokenizer: t\n", "reference_model.path: required key missing"),
                          ("not_a_key: 1\n", "not_a_key: unknown key")]:
        with pytest.raises(ConfigError, match=f"^{path}: {message}"):
            inputs(tmp_path, "model:\n  path: x\n" + body)
    with pytest.raises(ConfigError, match=r"^--set reference_model.dtype=int8: reference_model.dtype: "):
        inputs(tmp_path, "model:\n  path: x\nreference_model:\n  path: ref\n", "reference_model.dtype=int8")


def test_set_sends_a_scheme_key_to_the_config(tmp_path):
    config, recipe = inputs(tmp_path, "model:\n  path: x\nreference_model:\n  path: ref\n",
                            "reference_cache=cache.safetensors", "reference_model.path=other")
    assert config.reference_cache == "cache.safetensors" and config.reference_model.path == "other"
    assert "reference_cache" not in recipe.sections


def test_a_scheme_key_is_accepted_with_another_algorithm(tmp_path):
    """A config may serve several recipes (the reference is itself trained by a baseline recipe)."""
    config = checked_config(load_config(write(tmp_path, "c.yaml", "model:\n  path: x\nreference_model:\n  path: r\n")))
    assert config.reference_model.path == "r"


def test_the_reference_token_stays_secret_and_the_keys_are_logged(tmp_path):
    body = "model:\n  path: x\nreference_model:\n  path: ref\n  hf_token: hf_reference_secret\n"
    config, _ = inputs(tmp_path, body)
    params = flatten(config, "config")
    assert params["config.reference_model.path"] == "ref" and params["config.reference_cache"] == "None"
    assert params["config.reference_model.hf_token"] == "**********"
    assert "hf_reference_secret" not in dump_masked(config) and "hf_reference_secret" not in resolved_yaml(config)
    again = yaml.safe_load(resolved_yaml(config))
    assert again == {"model": {"path": "x"}, "reference_model": {"path": "ref"}}  # unset keys stay out
    plain, _ = inputs(tmp_path, "model:\n  path: x\n")
    assert flatten(plain, "config")["config.reference_model"] == "None"
    assert "reference" not in resolved_yaml(plain)


def test_only_an_online_reference_runs_beside_the_trained_model(tmp_path):
    online, _ = inputs(tmp_path, "model:\n  path: x\nreference_model:\n  path: ref\n")
    cached, _ = inputs(tmp_path, "model:\n  path: x\nreference_model:\n  path: ref\nreference_cache: c.safetensors\n")
    assert frozen_model(online).path == "ref" and frozen_model(cached) is None


def test_score_reference_refuses_a_config_without_its_keys(tmp_path, capsys):
    config = write(tmp_path, "c.yaml", "model:\n  path: x\n")
    assert main(["score-reference", "--config", str(config), "--recipe", str(write(tmp_path, "r.yaml", RECIPE))]) == 1
    assert "score-reference needs a recipe with algorithm: rho1 and a config with reference_model" in \
        capsys.readouterr().err
