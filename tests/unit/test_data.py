import json
import sys
import types
from pathlib import Path

import pytest
import torch

from wmtp.config import ConfigError, DataSettings, DataSource
from wmtp.data.sequences import build_sequences, tokenize_examples, train_bpe_tokenizer
from wmtp.data.sources import BUNDLED_MBPP, held_out, load_examples, read_source
from wmtp.loss import IGNORE_INDEX, mtp_labels

MBPP = str(Path(__file__).resolve().parents[2] / "data" / "mbpp")


def test_mbpp_real_splits_prompt_plus_solution():
    train = read_source(DataSource(kind="mbpp", dataset="mbpp", split="train"), {"mbpp": MBPP})
    assert len(train) == 374
    ex = train[0]
    assert ex.prompt.startswith('"""\n') and "assert max_chain_length" in ex.prompt
    assert ex.completion.startswith("class Pair") and "\r" not in ex.completion
    assert ex.meta["task_id"] == 601 and len(ex.meta["test_list"]) == 3
    test = read_source(DataSource(kind="mbpp", dataset="mbpp", split="test", limit=7), {"mbpp": MBPP})
    assert len(test) == 7


def test_humaneval_from_package():
    problems = read_source(DataSource(kind="humaneval"), {})
    assert len(problems) == 164
    assert problems[0].prompt.startswith("from typing import List") and problems[0].meta["entry_point"]


def codecontests_record(name, python=True):
    return {"name": name, "description": f"Read n, print n*2. ({name})",
            "solutions": {"language": [2, 3] if python else [2], "solution": ["int main(){}", "print(int(input())*2)"]
                          [: 2 if python else 1]},
            "incorrect_solutions": {"language": [3], "solution": ["print(0)"]},
            "public_tests": {"input": ["2\n"], "output": ["4\n"]},
            "private_tests": {"input": [], "output": []}, "generated_tests": {"input": [], "output": []}}


def test_codecontests_schema(tmp_path):
    path = tmp_path / "cc.jsonl"
    path.write_text("\n".join(json.dumps(codecontests_record(n, p)) for n, p in [("a", True), ("b", False)]))
    examples = read_source(DataSource(kind="codecontests", dataset="cc"), {"cc": str(path)})
    assert [e.key for e in examples] == ["codecontests/a"]  # b has no Python solution
    assert examples[0].completion == "print(int(input())*2)\n"
    assert examples[0].meta["public_tests"]["input"] == ["2\n"]


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n\n{"prompt": "Q: ", "completion": "A"}\n')
    examples = read_source(DataSource(kind="jsonl", dataset="d"), {"d": str(path)})
    assert [(e.prompt, e.completion) for e in examples] == [("", "hello"), ("Q: ", "A")]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": 3}\n', r"d\.jsonl:2: key `text` must be str, got int"),
    ('{"text": "ok"}\n{"txt": "x"}\n', r"d\.jsonl:2: missing key `text`"),
    ('{"text": "ok"}\n\n{not json}\n', r"d\.jsonl:3: invalid JSON"),
])
def test_malformed_record_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_source(DataSource(kind="jsonl", dataset="d"), {"d": str(path)})


def test_malformed_mbpp_json_names_record(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"text": "t", "code": "c", "test_list": []}, {"text": "t"}]))
    with pytest.raises(ConfigError, match=r"train\.json: record 1: missing key `code`"):
        read_source(DataSource(kind="mbpp", dataset="m"), {"m": str(tmp_path)})


def test_mbpp_without_dataset_reads_the_bundled_copy():
    assert BUNDLED_MBPP == Path(MBPP) and BUNDLED_MBPP.is_dir()
    sizes = {split: len(read_source(DataSource(kind="mbpp", split=split), {}))
             for split in ("train", "validation", "test")}
    assert sizes == {"train": 374, "validation": 90, "test": 500}  # 964: MBPP's 974 less its 10-task prompt split
    bundled = read_source(DataSource(kind="mbpp", split="test"), {})
    assert bundled == read_source(DataSource(kind="mbpp", dataset="mbpp", split="test"), {"mbpp": MBPP})
    assert bundled[0].meta["task_id"] == 11 and bundled[0].source == "mbpp:test"
    # `dataset: mbpp` with no `datasets.mbpp` in the config also reads the bundled copy
    assert read_source(DataSource(kind="mbpp", dataset="mbpp", split="test"), {}) == bundled


def test_mbpp_not_bundled_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setattr("wmtp.data.sources.BUNDLED_MBPP", tmp_path / "no-data" / "mbpp")
    with pytest.raises(ConfigError, match="MBPP is not bundled with this installation.*`datasets.mbpp`"):
        read_source(DataSource(kind="mbpp"), {})


def test_mbpp_hub_id_that_cannot_load_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"datasets\.mbpp: `nobody/no-such-mbpp` is not an existing path"):
        read_source(DataSource(kind="mbpp", dataset="mbpp", split="test"), {"mbpp": "nobody/no-such-mbpp"})


def test_mbpp_hub_id_gives_the_same_examples_as_the_files(monkeypatch):
    """A stand-in `datasets` package serves the bundled records, as the hub's MBPP has the same fields."""
    calls = []

    def load_dataset(hub_id, split):
        calls.append((hub_id, split))
        if hub_id != "google-research-datasets/mbpp":
            raise FileNotFoundError(f"Dataset '{hub_id}' doesn't exist on the Hub")
        return json.loads((BUNDLED_MBPP / f"{split}.json").read_text())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = read_source(DataSource(kind="mbpp", dataset="mbpp", split="validation"),
                      {"mbpp": "google-research-datasets/mbpp"})
    assert calls == [("google-research-datasets/mbpp", "validation")]
    assert hub == read_source(DataSource(kind="mbpp", split="validation"), {})
    with pytest.raises(ConfigError, match=r"datasets\.m: `someone/else` .* failed: Dataset 'someone/else' doesn't"):
        read_source(DataSource(kind="mbpp", dataset="m"), {"m": "someone/else"})


def test_unknown_dataset_name_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="dataset `x` is not in the config's datasets"):
        read_source(DataSource(kind="jsonl", dataset="x"), {})
    with pytest.raises(ConfigError, match="does not exist"):
        read_source(DataSource(kind="jsonl", dataset="x"), {"x": str(tmp_path / "missing.jsonl")})


def test_validation_holdout_is_deterministic_and_disjoint():
    settings = DataSettings(train=[DataSource(kind="mbpp", dataset="mbpp")], validation_fraction=0.1)
    train, val = load_examples(settings, {"mbpp": MBPP})
    train2, val2 = load_examples(settings, {"mbpp": MBPP})
    assert [e.key for e in val] == [e.key for e in val2] and 20 <= len(val) <= 60
    assert not {e.key for e in train} & {e.key for e in val}
    assert held_out("x", 0.0) is False


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["def f(x):\n    return x + 1\n" * 50, "print('hello world')\n" * 50], 300, 2)


def test_packing_marks_documents_and_labels_stop_at_boundaries(tokenizer):
    from wmtp.data.sources import Example

    docs = tokenize_examples([Example("# p\n", "x = 1\n", "s", "a"), Example("# q\n", "y = 2\n", "s", "b")],
                             tokenizer)
    seqs = build_sequences(docs, 8, packing=True, pad_id=tokenizer.pad_token_id, seed=0)
    total = sum(len(d) for d, _ in docs)
    assert int(seqs.attention_mask.sum()) == total
    labels = mtp_labels(seqs.input_ids, 2, attention_mask=seqs.attention_mask, document_ids=seqs.document_ids)
    flat_docs = seqs.document_ids
    for b, t, h in (labels != IGNORE_INDEX).nonzero().tolist():
        assert flat_docs[b, t] == flat_docs[b, t + 1 + h]
    # every document ends with eos; none starts with bos, since this tokenizer adds none (data.bos_prefix)
    assert (seqs.input_ids == tokenizer.eos_token_id).sum() == 2


def test_prompt_mask_and_padding_without_packing(tokenizer):
    from wmtp.data.sources import Example

    docs = tokenize_examples([Example("# prompt\n", "x = 1\n", "s", "a")], tokenizer)
    seqs = build_sequences(docs, 32, packing=False, pad_id=tokenizer.pad_token_id, seed=0)
    n = len(docs[0][0])
    assert seqs.attention_mask[0, :n].all() and not seqs.attention_mask[0, n:].any()
    assert int(seqs.prompt_mask.sum()) == docs[0][1]
    labels = mtp_labels(seqs.input_ids, 1, attention_mask=seqs.attention_mask, prompt_mask=seqs.prompt_mask)
    assert int((labels != IGNORE_INDEX).sum()) == n - docs[0][1]


def test_shuffle_is_deterministic_by_seed(tokenizer):
    from wmtp.data.sources import Example

    docs = tokenize_examples([Example("", f"v{i} = {i}\n", "s", str(i)) for i in range(20)], tokenizer)
    a = build_sequences(docs, 16, packing=True, pad_id=0, seed=1).input_ids
    b = build_sequences(docs, 16, packing=True, pad_id=0, seed=1).input_ids
    c = build_sequences(docs, 16, packing=True, pad_id=0, seed=2).input_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_python_stdlib_corpus_is_sorted_real_code():
    examples = read_source(DataSource(kind="python-stdlib", limit=5), {})
    assert len(examples) == 5 and all(e.completion.strip() for e in examples)
    keys = [e.key for e in examples]
    assert keys == sorted(keys) and not any("/test/" in k for k in keys)
