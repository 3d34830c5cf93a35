import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a 2-core machine: one thread per process avoids oversubscription (and subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
from helpers.models import tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


# ------------------------------------------------------------------ a real S3 API server on localhost
@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """A bucket on the server, credentials in the environment (the standard chain), and a fresh cache."""
    import boto3
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wmtp-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wmtp-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("WMTP_CACHE", str(tmp_path / "cache"))
    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    fsspec.filesystem("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"wmtp-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    fsspec.config.conf.clear()


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo process group, enough for fully_shard to apply its policies and wrap a model in this
    process."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=1))
    yield
    dist.destroy_process_group()
