"""Runs whose output_dir is in object storage, against a real S3 API server on localhost (moto's server mode, over
HTTP with s3fs and boto3 as in production): the upload of checkpoints and the final model with their completion
markers, resume from S3 after the local run directory is lost, the server going down during an upload, wrong
credentials, a missing bucket, MLflow artifacts in S3, and two ranks uploading their own shards."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers.tiny_run import final_weights, train_args
from helpers.torchrun import run_torchrun

from wmtp.cli import main
from wmtp.runtime.mirror import COMPLETE, staging_dir, writer_rank

ROOT = Path(__file__).resolve().parents[2]
SECRET = "wmtp-test-secret"  # the secret key the s3 fixture puts in the environment
REMOTE = {"checkpoint": {"every_steps": 2, "keep_last": 2},
          "storage": {"upload_retries": 1, "retry_backoff_seconds": 0.01}}
STEPS = {"train": {"max_steps": 6}}


class CuttableProxy:
    """An HTTP proxy in front of the S3 server that goes down (closes every connection without an answer, as a
    server that died does) right after it has passed on a request whose path ends with `cut_after`."""

    def __init__(self, upstream: str, cut_after: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def forward(self) -> None:
                if proxy.down:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()
                if self.command == "PUT" and self.path.split("?")[0].endswith(cut_after):
                    proxy.down = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.down = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def use_endpoint(monkeypatch, url: str) -> None:
    import fsspec

    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", url)
    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    fsspec.filesystem("s3").clear_instance_cache()


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def remote_record(client, bucket: str, run: str) -> tuple[dict, list[dict]]:
    """A run's run.json and metrics.jsonl lines in the bucket."""
    def read(name: str) -> str:
        return client.get_object(Bucket=bucket, Key=f"runs/{run}/{name}")["Body"].read().decode()

    return json.loads(read("run.json")), [json.loads(line) for line in read("metrics.jsonl").splitlines()]


def train_steps(metrics: list[dict]) -> list[int]:
    return [m["step"] for m in metrics if "train/loss" in m]


def test_a_run_lost_mid_training_resumes_from_s3_with_the_same_final_weights(s3, s3_server, tmp_path, monkeypatch,
                                                                            capsys):
    client, bucket = s3
    config = {**REMOTE, "output_dir": f"s3://{bucket}/runs", "mlflow": {"enabled": True}}
    staging = staging_dir(f"s3://{bucket}/runs", None)

    # an uninterrupted run, uploaded as it goes
    assert main(train_args(tmp_path, "full", config=config, recipe=STEPS)) == 0, capsys.readouterr().err
    assert f"uploaded to s3://{bucket}/runs/full" in capsys.readouterr().out
    remote = keys(client, bucket, "runs/full/")
    completes = [k for k in remote if k.endswith(COMPLETE)]
    assert completes == ["runs/full/checkpoints/step-00000004/_COMPLETE.json",
                         "runs/full/checkpoints/step-00000006/_COMPLETE.json", "runs/full/final/_COMPLETE.json"]
    assert "runs/full/final/model.safetensors" in remote
    local = sorted(p.name for p in (staging / "full" / "checkpoints").iterdir())
    assert local == ["step-00000004", "step-00000006"]  # keep_last bounds the local disk too

    # the same run, whose store goes down right after its step-2 checkpoint is complete and the run's records as of
    # that step are copied to the run's top level (run.json the last of them, by name): the next upload fails after
    # its retries and the run stops with an error naming the checkpoint and the URL
    proxy = CuttableProxy(s3_server, "runs/lost/run.json")
    use_endpoint(monkeypatch, proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main(train_args(tmp_path, "lost", config=config, recipe=STEPS)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wmtp: error: uploading checkpoint step-0000000") and f"s3://{bucket}/runs/lost" in err
    proxy.close()
    remote = keys(client, bucket, "runs/lost/")
    assert [k for k in remote if k.endswith(COMPLETE)] == ["runs/lost/checkpoints/step-00000002/_COMPLETE.json"]
    assert remote_record(client, bucket, "lost")[0]["params"]  # the bucket has the run's records as of step 2
    assert train_steps(remote_record(client, bucket, "lost")[1]) == [1, 2]

    # the machine is lost: its local run directory is gone; another machine resumes from S3
    use_endpoint(monkeypatch, s3_server)
    shutil.rmtree(staging / "lost")
    assert main([*train_args(tmp_path, "lost", config=config, recipe=STEPS), "--resume", "auto"]) == 0
    full, resumed = final_weights(staging / "full"), final_weights(staging / "lost")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert "runs/lost/final/_COMPLETE.json" in keys(client, bucket, "runs/lost/")
    # the records of the lost machine's steps came back with the checkpoint and were continued: every step once
    record, metrics = remote_record(client, bucket, "lost")
    assert record["params"] == remote_record(client, bucket, "full")[0]["params"] and record["status"] == "FINISHED"
    assert train_steps(metrics) == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if "val/loss_initial" in m] == [0]

    # no credential in anything the runs wrote: local files, the MLflow store, the uploaded objects
    for path in staging.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for key in keys(client, bucket, "runs/"):
        assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key


def test_an_existing_remote_run_needs_resume_and_a_missing_bucket_fails_before_training(s3, tmp_path, capsys):
    client, bucket = s3
    config = {**REMOTE, "output_dir": f"s3://{bucket}/runs"}
    args = train_args(tmp_path, "once", config=config, recipe={"train": {"max_steps": 1}})
    assert main(args) == 0
    shutil.rmtree(staging_dir(f"s3://{bucket}/runs", None) / "once")
    assert main(args) == 1  # the local copy is gone, but the remote run is there
    assert f"s3://{bucket}/runs/once already holds a run" in capsys.readouterr().err
    missing = train_args(tmp_path, "x", config={**config, "output_dir": "s3://wmtp-no-such-bucket/runs"})
    assert main(missing) == 1
    err = capsys.readouterr().err.strip()
    endpoint = os.environ["FSSPEC_S3_ENDPOINT_URL"]
    assert err == (f"wmtp: error: output_dir s3://wmtp-no-such-bucket/runs/x: bucket `wmtp-no-such-bucket` does not "
                   f"exist at {endpoint}; create it or correct output_dir")
    assert main([*missing, "--dry-run"]) == 1  # the dry run checks it too


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize(("endpoint", "reason"), [(f"http://127.0.0.1:{closed_port()}", "connection refused"),
                                                  ("http://wmtp-no-such-host.invalid:9000", "host name not found")])
def test_an_unreachable_store_is_not_called_a_missing_bucket(s3, tmp_path, monkeypatch, capsys, endpoint, reason):
    _, bucket = s3
    use_endpoint(monkeypatch, endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    args = train_args(tmp_path, "x", config={**REMOTE, "output_dir": f"s3://{bucket}/runs"})
    assert main([*args, "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"wmtp: error: output_dir s3://{bucket}/runs/x: cannot reach the store at {endpoint} ({reason}); "
                   "check the endpoint URL and the network")


def test_resume_from_a_remote_checkpoint_url(s3, tmp_path, capsys):
    client, bucket = s3
    config = {**REMOTE, "output_dir": f"s3://{bucket}/runs"}
    assert main(train_args(tmp_path, "src", config=config, recipe=STEPS)) == 0
    staging = staging_dir(f"s3://{bucket}/runs", None)
    shutil.rmtree(staging / "src")
    url = f"s3://{bucket}/runs/src/checkpoints/step-00000004"
    config_path, recipe_path = tmp_path / "config.yaml", tmp_path / "recipe.yaml"
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path), "--resume", url]) == 0
    assert (staging / "src" / "final").is_dir()
    bad = ["train", "--config", str(config_path), "--recipe", str(recipe_path), "--resume", url.replace("04", "03")]
    assert main(bad) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err


@pytest.fixture
def locked_server(tmp_path):
    """A second S3 server that checks credentials (moto's IAM authentication): keys it never issued are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_wrong_credentials_are_a_clear_error_that_never_shows_the_secret(s3, locked_server, tmp_path, monkeypatch,
                                                                         capsys):
    use_endpoint(monkeypatch, locked_server)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    write = train_args(tmp_path, "x", config={**REMOTE, "output_dir": "s3://some-bucket/runs"})
    assert main(write) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"wmtp: error: output_dir s3://some-bucket/runs/x: the store at {locked_server} refused these "
                   "credentials (InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our "
                   "records); check the storage credentials")
    assert SECRET not in err
    read = train_args(tmp_path, "y", config={"model": {"path": "s3://some-bucket/model", "from_scratch": None,
                                                       "train_tokenizer": None}})
    assert main(read) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmtp: error: model.path s3://some-bucket/model: access denied; check the storage "
                          "credentials") and SECRET not in err


def test_mlflow_artifacts_go_to_s3_and_a_large_model_is_not_copied(s3, s3_server, tmp_path, monkeypatch, capsys):
    import mlflow

    client, bucket = s3
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"mlflow": {"enabled": True, "tracking_uri": tracking, "experiment": "s3-artifacts",
                       "artifact_location": f"s3://{bucket}/mlartifacts"}}
    small = {"mlflow": {**base["mlflow"], "log_model_max_size": "1KB"}}
    assert main(train_args(tmp_path, "capped", config=small, recipe={"train": {"max_steps": 1}})) == 0
    assert main(train_args(tmp_path, "logged", config=base, recipe={"train": {"max_steps": 1}})) == 0
    mlflow.set_tracking_uri(tracking)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["s3-artifacts"], output_format="list")}
    capped, logged = runs["capped"], runs["logged"]
    assert capped.info.artifact_uri.startswith(f"s3://{bucket}/mlartifacts/")
    assert capped.data.tags["wmtp.model_not_logged"].endswith("GB > log_model_max_size 1KB")
    assert capped.data.tags["wmtp.model_location"].endswith("capped/final")
    objects = keys(client, bucket, "mlartifacts/")
    capped_prefix = capped.info.artifact_uri.removeprefix(f"s3://{bucket}/")
    logged_prefix = logged.info.artifact_uri.removeprefix(f"s3://{bucket}/")
    assert f"{capped_prefix}/configs/config.yaml" in objects
    assert not [k for k in objects if k.startswith(f"{capped_prefix}/model/")]
    assert f"{logged_prefix}/model/model.safetensors" in objects


def test_writer_rank_partitions_a_checkpoint_between_ranks():
    assert writer_rank("state/__0_0.distcp") == 0 and writer_rank("state/__1_0.distcp") == 1
    assert writer_rank("state/__12_3.distcp") == 12 and writer_rank("rng-rank3.json") == 3
    assert writer_rank("state/.metadata") == 0 and writer_rank("trainer_state.json") == 0
    assert writer_rank("tokenizer/tokenizer.json") == 0


@pytest.mark.slow
def test_two_ranks_upload_their_own_shards_and_rank0_marks_the_checkpoint_complete(s3, s3_server, tmp_path):
    client, bucket = s3
    config = {**REMOTE, "output_dir": f"s3://{bucket}/runs", "compute": {"distributed": "fsdp2"}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "wmtp",
                *train_args(tmp_path, "two", config=config, recipe={"train": {"max_steps": 4, "micro_batch_size": 2}})]
    proc = run_torchrun(torchrun, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = keys(client, bucket, "runs/two/checkpoints/step-00000004/")
    assert "runs/two/checkpoints/step-00000004/_UPLOADED-rank1" in remote
    marker = json.loads(client.get_object(Bucket=bucket, Key="runs/two/checkpoints/step-00000004/_COMPLETE.json")
                        ["Body"].read())
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "rng-rank0.json", "rng-rank1.json"} <= set(marker["files"])
    for rel, size in marker["files"].items():
        head = client.head_object(Bucket=bucket, Key=f"runs/two/checkpoints/step-00000004/{rel}")
        assert head["ContentLength"] == size, rel


@pytest.mark.slow
def test_a_remote_tracking_server_with_artifacts_in_s3(s3, s3_server, tmp_path):
    """`mlflow server` over HTTP (as on a cluster), proxying artifacts to S3: the run, its metrics and its model
    arrive, and the artifacts are objects in the bucket."""
    from mlflow import MlflowClient

    client, bucket = s3
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", f"s3://{bucket}/mlflow-artifacts"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        config = {"mlflow": {"enabled": True, "tracking_uri": uri, "experiment": "remote", "log_model": True}}
        assert main(train_args(tmp_path, "tracked", config=config, recipe={"train": {"max_steps": 2}})) == 0
        tracking = MlflowClient(uri)
        (run,) = tracking.search_runs([tracking.get_experiment_by_name("remote").experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0
        assert "model" in [a.path for a in tracking.list_artifacts(run.info.run_id)]
        objects = keys(client, bucket, "mlflow-artifacts/")
        assert [k for k in objects if k.endswith(f"{run.info.run_id}/artifacts/model/model.safetensors")]
    finally:
        server.terminate()
        server.wait(timeout=30)
