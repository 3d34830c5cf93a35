"""The house rules of docs/architecture.md, checked on the source: layers, no import circles, schemes only in
weighting/, a light command door, and a repository that stands alone."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wmtp.weighting import SCHEMES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "wmtp"

# The folders of docs/architecture.md and their layers: a module may import modules of its own layer or below,
# never above. Every module of src/wmtp/ is in one of these (a new folder needs a row here and in the docs).
LAYERS = {
    "config": 0, "loss": 0, "runtime": 0,
    "model": 1, "data": 1, "execution": 1,
    "components": 2,
    "weighting": 3,
    "training": 4, "evaluate": 4, "integrations": 4,
    "cli": 5, "__main__": 5, "__init__": 5,
}
FOLDERS = {"runtime", "model", "data", "execution", "components", "weighting", "training", "evaluate",
           "integrations"}
# weighting/: the schemes (SCHEMES' modules) and what they share (base, rewards, per_head, reference)
SCHEME_MODULES = {f"weighting.{name}" for name in SCHEMES.values()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def runtime_imports(path: Path) -> set[str]:
    """The wmtp modules `path` imports at run time (module level or inside functions; not `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    skipped = {id(node) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
               for child in n.body for node in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("wmtp.") for a in node.names if a.name.startswith("wmtp.")}
            continue
        if node.level == 0:
            if node.module and node.module.startswith("wmtp"):
                base = node.module.removeprefix("wmtp").lstrip(".").split(".")
            else:
                continue
        else:
            base = (package[:len(package) - node.level + 1] if node.level > 1 else package) + \
                   (node.module.split(".") if node.module else [])
        base = [b for b in base if b]
        for alias in node.names:  # `from . import x` may name a submodule
            candidate = [*base, alias.name]
            target = ".".join(candidate) if (PACKAGE.joinpath(*candidate).with_suffix(".py").is_file()
                                             or PACKAGE.joinpath(*candidate).is_dir()) else ".".join(base)
            if target:
                found.add(target)
    return found - {module_name(path)}


GRAPH = {module_name(p): runtime_imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_import_graph_is_read():
    assert {"weighting.base", "runtime.distributed", "loss"} <= GRAPH["weighting.rho1.scheme"]
    assert "execution.samples" in GRAPH["weighting.rewards"] and "training.build" in GRAPH["training.trainer"]


def test_the_folders_are_the_layers():
    top = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert {p for p in top if (PACKAGE / p).is_dir()} == FOLDERS
    assert top == set(LAYERS), sorted(top ^ set(LAYERS))


def scheme_of(module: str) -> str | None:
    """The scheme module `module` belongs to (weighting.rho1 for weighting.rho1.cache), or None."""
    return next((s for s in SCHEME_MODULES if module == s or module.startswith(s + ".")), None)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if scheme_of(m)))
def test_a_scheme_never_imports_another_scheme(module):
    others = {m for m in GRAPH[module] if scheme_of(m) not in (None, scheme_of(module))}
    assert not others, f"{module} imports {sorted(others)}: a hybrid reaches its parts through SCHEMES"


def private_imports(path: Path) -> list[str]:
    """`from <module> import _name` of another module (relative or absolute wmtp imports)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("wmtp")):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                      and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_across_modules(path):
    assert not private_imports(path), private_imports(path)


@pytest.mark.parametrize("path", sorted(p for folder in ("benchmarks", "experiments", "tools")
                                        for p in (ROOT / folder).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmarks_experiments_and_tools_use_public_names_only(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wmtp"):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base.startswith("wmtp") or base in {"model", "scheme", "trainer", "setup"}:
                found.append(f"{base}.{node.attr}")
    assert not found, found


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    above = {m for m in GRAPH[module] if layer(m) > layer(module)}
    assert not above, f"{module} (layer {layer(module)}) imports {sorted(above)} from a higher layer"


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_execution_imports_nothing_from_training_or_evaluation():
    for module, imports in GRAPH.items():
        if module.startswith("execution"):
            assert not {m for m in imports if m.split(".")[0] in ("training", "weighting", "evaluate", "cli")}, module


def test_integrations_are_a_leaf():
    """integrations/ bridges other frameworks to the model, the loss and the schemes: nothing imports it, and it
    uses neither the training loop nor evaluation."""
    assert "weighting.base" in GRAPH["integrations.hf_trainer"]
    for module, imports in GRAPH.items():
        if module.startswith("integrations"):
            assert not {m for m in imports if m.split(".")[0] in ("training", "evaluate", "cli")}, module
        else:
            assert not {m for m in imports if m.startswith("integrations")}, module


def test_nothing_outside_weighting_branches_on_the_algorithm_name():
    names = r"[\"'](baseline-mtp|rho1|critic|gradnorm|hybrid|grpo)[\"']"
    branch = re.compile(rf"algorithm\s*(==|!=|\bin\b|\bnot in\b)|\.(rho1|critic|pretrain|gradnorm|grpo)\b"
                        rf"|[=!]=\s*{names}|{names}\s*(==|!=|\bin\b)|\bin\s*\(?{names}")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "weighting" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if branch.search(code) and not code.lstrip().startswith(("from ", "import ")):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_trainer_holds_no_model_loading_or_reference_scoring():
    source = (PACKAGE / "training" / "trainer.py").read_text()
    for word in ("from_pretrained", "load_causal_lm", "build_model", "AutoTokenizer", "reference"):
        assert word not in source, word


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


LOADED = "import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    out = run_python("from wmtp.cli import main\n"
                     "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['train']):\n"
                     "    try:\n        main(argv)\n    except SystemExit:\n        pass\n" + LOADED)
    assert out.splitlines()[-1] == "[]"


def test_config_errors_answer_without_torch(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  path: x\nnot_a_key: 1\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    out = run_python(f"from wmtp.cli import main\nassert main(['train', '--config', {str(config)!r}, '--recipe', "
                     f"{str(recipe)!r}]) == 1\n" + LOADED)
    assert out.splitlines()[-1] == "[]"


def test_a_scheme_section_error_names_the_file_and_key_without_transformers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  path: x\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: rho1\nrho1:\n  mode: topk\n  temperature: 2\n"
                      "data:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    code = (f"from wmtp.cli import main\nassert main(['train', '--config', {str(config)!r}, '--recipe', "
            f"{str(recipe)!r}]) == 1\n" + LOADED)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert f"{recipe}: rho1: `temperature` only applies to mode weighted" in result.stderr
    assert "transformers" not in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(("sections", "message"), [
    ("algorithm: nope\n", f"algorithm: unknown `nope` (choose from {', '.join(sorted(SCHEMES))})"),
    ("rho1:\n  mode: topk\n", "rho1: the `rho1` section goes with algorithm: rho1, not baseline-mtp"),
    ("algorithm: critic\npretrain: {}\n", "critic: required key missing"),
    ("extra_section: 1\n", "extra_section: unknown key"),
])
def test_scheme_sections_belong_to_their_scheme(tmp_path, sections, message):
    from wmtp.config import ConfigError, load_recipe
    from wmtp.weighting import scheme_settings

    path = tmp_path / "r.yaml"
    path.write_text(sections + "data:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        scheme_settings(load_recipe(path))


def test_every_recipe_in_configs_still_loads():
    from wmtp.config import load_recipe
    from wmtp.weighting import scheme_settings

    recipes = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if re.search(r"^train:", p.read_text(), re.M)]
    assert len(recipes) >= 20
    for path in recipes:
        scheme_settings(load_recipe(path))


def test_every_scheme_family_has_a_sequential_recipe():
    """Issue 22: a recipe with `mtp.head_type: sequential` for every weighting scheme, loading as its own scheme,
    and one of them with DeepSeek's depth coefficients (docs/method.md §3)."""
    from wmtp.config import load_recipe
    from wmtp.weighting import scheme_settings

    sequential = {}
    for path in sorted((ROOT / "configs" / "recipes").rglob("*.yaml")):
        recipe = load_recipe(path)
        if recipe.mtp.head_type == "sequential":
            scheme_settings(recipe)
            sequential.setdefault(recipe.algorithm, []).append(recipe)
    assert set(sequential) == set(SCHEMES), sorted(set(SCHEMES) - set(sequential))
    assert any(r.mtp.head_coef_rule == "deepseek" for rs in sequential.values() for r in rs)


def test_no_file_refers_to_a_path_outside_the_repository():
    outside = re.compile(r"shared/|REFERENCE\.md")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    found = [name for name in tracked if name.endswith((".py", ".yaml", ".md", ".toml", "Makefile"))
             and (ROOT / name).is_file() and outside.search((ROOT / name).read_text(errors="replace"))
             and name != "tests/test_architecture.py"]
    assert not found, found


def test_method_sections_cited_in_the_code_exist():
    method = (ROOT / "docs" / "method.md").read_text()
    headings = set(re.findall(r"^#+ (§\d+(?:\.\d+)?)", method, flags=re.M))
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), ROOT / "README.md"]:
        for match in re.finditer(r"docs/method\.md (§\d+(?:\.\d+)?)(?:[–-](§?\d+))?", path.read_text()):
            cited.add(match.group(1))
    assert cited and cited <= headings, sorted(cited - headings)
