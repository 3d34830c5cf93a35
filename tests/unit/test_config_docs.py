"""docs/configuration.md is generated from the pydantic schemas (tools/config_docs.py): it fails here while the
file differs from what the generator writes, so a key added, removed or re-described without `make
config-docs` is caught."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wmtp.config import Config, Recipe
from wmtp.weighting import SCHEMES, config_schemas, plugin

ROOT = Path(__file__).resolve().parents[2]


def generator():
    """tools/config_docs.py as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "tools" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.exists() and page.read_text() == generator().render(), \
        "docs/configuration.md is stale: run `make config-docs`"


def test_page_lists_every_key_of_the_config_the_recipe_and_each_scheme():
    tool = generator()
    page = tool.render()
    keys = [*Config.model_fields, *Recipe.model_fields, "compute.fsdp.cpu_offload", "data.train[].kind"]
    keys += [name for schema in config_schemas().values() for name in schema.model_fields]  # schemes' config keys
    keys += ["reference_model.path", "reference_model.dtype"]
    for algorithm in SCHEMES:
        for section, field in plugin(algorithm).settings.model_fields.items():
            settings = tool.section_model(field.annotation)
            keys += [f"{section}.{name}" for name in (settings.model_fields if settings else [])]
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, missing


def test_a_field_description_reaches_the_page():
    description = " ".join(Config.model_fields["output_dir"].description.split())
    assert description.replace("|", "\\|") in generator().render()
