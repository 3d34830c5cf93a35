"""Deployment files, tested as far as this machine allows (no container daemon): the Dockerfiles pass hadolint and
keep their promises, the lock file pins every dependency, compose and the image workflow hang together, and each
cluster launcher runs its exact training command here (one node, one process, --dry-run on the tiny config)."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers.tiny_run import files

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_the_linter_and_keep_their_promises(dockerfile):
    result = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M)  # not root
    assert 'ENTRYPOINT ["wmtp"]' in text and "HEALTHCHECK" in text and "bubblewrap" in text
    assert "pip install --no-deps -r docker/requirements.lock" in text
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert torch == "2.13.0"  # inside pyproject's torch>=2.6,<2.14
    for copied in ("src", "configs", "launch", "data"):
        assert f"COPY {copied} ./{copied}" in text


def test_the_lock_file_pins_every_dependency_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(d) for d in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    pins = {}
    for line in (ROOT / "docker" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), line
            pins[name.lower().replace("_", "-")] = version
    assert wanted - {"torch"} <= set(pins), sorted(wanted - {"torch"} - set(pins))
    assert "torch" not in pins  # each image installs its own build


def test_compose_wires_mlflow_to_the_s3_store_and_wmtp_to_mlflow():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"minio", "mlflow", "wmtp"} <= set(services)
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3://mlflow" in services["mlflow"]["command"]
    wmtp = services["wmtp"]
    assert wmtp["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert wmtp["environment"]["WMTP_OUTPUT_DIR"].startswith("s3://wmtp/")  # a bucket the `buckets` service makes
    assert wmtp["environment"]["FSSPEC_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "local/wmtp" in " ".join(services["buckets"]["entrypoint"])
    assert wmtp["build"]["dockerfile"] == "docker/Dockerfile.cpu" and "mlflow" in wmtp["depends_on"]
    config = wmtp["command"][wmtp["command"].index("--config") + 1]
    from wmtp.config import load_config

    os.environ.setdefault("MLFLOW_TRACKING_URI", "")
    assert load_config(ROOT / config).mlflow.tracking_uri is not None


def test_the_image_workflow_builds_both_images_on_tags():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML reads the key `on` as True
    builds = workflow["jobs"]["image"]["strategy"]["matrix"]["include"]
    assert {b["dockerfile"] for b in builds} == {str(p.relative_to(ROOT)) for p in DOCKERFILES}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(tmp_path: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    config, recipe = files(tmp_path)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}:{tmp_path / 'bin'}:{os.environ['PATH']}",
                "WMTP_CONFIG": str(config), "WMTP_RECIPE": str(recipe), "MASTER_PORT": str(free_port()), **env}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=300)


@pytest.mark.slow
def test_torchrun_launcher_runs_its_command(tmp_path):
    result = run_launcher(tmp_path, ["bash", "launch/torchrun.sh", "--dry-run"],
                          {"NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: configuration" in result.stdout and "memory per rank" in result.stdout


@pytest.mark.slow
def test_slurm_script_runs_its_command_through_srun(tmp_path):
    """The sbatch script as Slurm would run it on one node; `srun` is a stand-in that starts its task here."""
    shim = tmp_path / "bin" / "srun"
    shim.parent.mkdir()
    shim.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    result = run_launcher(tmp_path, ["bash", "launch/slurm.sbatch", "--dry-run"],
                          {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1",
                           "SLURM_JOB_ID": "42"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: configuration" in result.stdout
    assert "#SBATCH --ntasks-per-node=1" in (ROOT / "launch" / "slurm.sbatch").read_text()


@pytest.mark.slow
def test_kubernetes_manifest_runs_its_container_command(tmp_path):
    """The PyTorchJob's container command, with the environment the manifest and the operator give a pod."""
    job = yaml.safe_load((ROOT / "launch" / "k8s-pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    master = specs["Master"]["template"]["spec"]["containers"][0]
    assert specs["Worker"]["template"] == specs["Master"]["template"]
    env = {item["name"]: item["value"] for item in master["env"]}
    assert int(env["WMTP_NNODES"]) == specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    assert master["resources"]["limits"]["nvidia.com/gpu"] == int(env["NPROC_PER_NODE"])
    # one node, one process, the tiny config; the operator's RANK and MASTER_ADDR as for the master pod
    pod = {**env, "WMTP_NNODES": "1", "NPROC_PER_NODE": "1", "RANK": "0", "MASTER_ADDR": "localhost",
           "WMTP_OUTPUT_DIR": str(tmp_path / "runs")}
    pod.pop("WMTP_CONFIG")
    pod.pop("WMTP_RECIPE")
    command = [*master["command"][:-1], master["command"][-1].replace("--resume auto", "--dry-run")]
    result = run_launcher(tmp_path, command, pod)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: configuration" in result.stdout
