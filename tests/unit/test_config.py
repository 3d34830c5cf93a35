import pytest

from wmtp.config import ConfigError, dump_masked, flatten, load_config, load_recipe, substitute_env

CONFIG = """
model:
  path: ${WMTP_TEST_MODEL:-some/model}
  hf_token: ${WMTP_TEST_TOKEN:-hf_secret_value}
output_dir: out
"""

RECIPE = """
data:
  train:
    - kind: mbpp
      dataset: mbpp
train:
  max_steps: 3
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_files_load_with_defaults(tmp_path):
    config = load_config(write(tmp_path, "c.yaml", CONFIG))
    recipe = load_recipe(write(tmp_path, "r.yaml", RECIPE))
    assert config.model.path == "some/model"
    assert recipe.mtp.n_heads == 4 and recipe.loss.reduction == "token_mean"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "r.yaml", RECIPE + "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: optim\.learning_rate: unknown key"):
        load_recipe(path)


def test_unknown_nested_key_in_list(tmp_path):
    path = write(tmp_path, "r.yaml", RECIPE.replace("dataset: mbpp", "dataset: mbpp\n      splitt: x"))
    with pytest.raises(ConfigError, match=r"data\.train\.0\.splitt: unknown key"):
        load_recipe(path)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "r.yaml", RECIPE + "mtp:\n  n_heads: four\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: mtp\.n_heads: .*'four'"):
        load_recipe(path)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: train: required key missing"):
        load_recipe(write(tmp_path, "r.yaml", "data:\n  train:\n    - kind: mbpp\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config("nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ invalid YAML"):
        load_config(write(tmp_path, "bad.yaml", "model:\n  path: x\n bad: : :\n"))


def test_missing_env_var_names_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WMTP_NOT_SET", raising=False)
    path = write(tmp_path, "c.yaml", "model:\n  path: ${WMTP_NOT_SET}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.path: environment variable WMTP_NOT_SET is not set"):
        load_config(path)


def test_unset_env_var_message_is_file_then_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WMTP_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path, "cfg.yaml", "model:\n  path: ${WMTP_TEST_UNSET_VAR}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: model.path: environment variable WMTP_TEST_UNSET_VAR is not set")


def test_env_substitution_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("WMTP_TEST_MODEL", "org/real")
    assert load_config(write(tmp_path, "c.yaml", CONFIG)).model.path == "org/real"
    assert substitute_env({"a": ["x${V:-d}y"]}, "f", env={}) == {"a": ["xdy"]}
    assert substitute_env("${V:-d}", "f", env={"V": "set"}) == "set"
    assert substitute_env("${V:-}", "f", env={}) == ""


def test_secrets_never_printed(tmp_path):
    config = load_config(write(tmp_path, "c.yaml", CONFIG))
    assert config.model.hf_token.get_secret_value() == "hf_secret_value"
    assert "hf_secret_value" not in dump_masked(config)
    assert "hf_secret_value" not in str(flatten(config))
    assert "hf_secret_value" not in repr(config)


@pytest.mark.parametrize("body,message", [
    ("model: {}\n", "exactly one of `path` and `from_scratch`"),
    ("model:\n  path: x\n  train_tokenizer: {}\n", "only goes with `from_scratch`"),
    ("model:\n  from_scratch: {}\n", "exactly one of `train_tokenizer` and `tokenizer`"),
])
def test_model_source_rules(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "c.yaml", body))


@pytest.mark.parametrize("extra,message", [
    ("mtp:\n  n_heads: 2\n  head_coef: [1.0]\n", "head_coef has 1 values for n_heads=2"),
    ("train:\n  micro_batch_size: 2\n", "max_steps or num_epochs"),
    ("train:\n  max_steps: 2\n  early_stopping: {}\n", "early_stopping needs eval_every"),
])
def test_recipe_rules(tmp_path, extra, message):
    text = RECIPE.replace("train:\n  max_steps: 3\n", "") + extra
    if "train:" not in extra:
        text += "train:\n  max_steps: 3\n"
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, "r.yaml", text))


@pytest.mark.parametrize("extra,message", [
    ("data:\n  train:\n    - kind: jsonl\n      dataset: d\n      split: train\n",
     "`split` does not apply to kind jsonl"),
    ("data:\n  train:\n    - kind: mbpp\n      dataset: d\n      text_field: body\n",
     "`text_field` does not apply to kind mbpp"),
    ("data:\n  train:\n    - kind: mbpp\n      dataset: d\n  validation:\n    - kind: mbpp\n      dataset: d\n"
     "  validation_fraction: 0.1\n", "not both"),
    ("data:\n  train:\n    - kind: mbpp\n      dataset: d\nschedule:\n  kind: constant\n  min_lr_ratio: 0.5\n",
     "`min_lr_ratio` does not apply to kind constant"),
])
def test_keys_that_would_be_ignored_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, "r.yaml", extra + "train:\n  max_steps: 3\n"))
