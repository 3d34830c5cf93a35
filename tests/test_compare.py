"""`wmtp compare`: the intervals against scipy's own tests, verdicts that follow the intervals only, and the command
on real tiny runs read from their directories and from MLflow."""

from __future__ import annotations

import json
import random

import pytest
from scipy import stats
from tiny_run import train_args

from wmtp.cli import main
from wmtp.config import ConfigError
from wmtp.evaluate.compare import Run, compare, difference, summarize


def test_the_paired_interval_is_scipys_paired_t_interval():
    rng = random.Random(0)
    for n in (2, 3, 5, 9):
        base = [rng.gauss(2.0, 0.3) for _ in range(n)]
        group = [b + rng.gauss(-0.1, 0.05) for b in base]
        d = difference({str(i): g for i, g in enumerate(group)}, {str(i): b for i, b in enumerate(base)})
        want = stats.ttest_rel(group, base).confidence_interval(0.95)
        assert d.paired and d.n == n
        assert (d.low, d.high) == pytest.approx((want.low, want.high), rel=1e-9)
        assert d.lower + d.higher == n


def test_unmatched_seeds_use_welchs_interval():
    rng = random.Random(1)
    a = {f"a{i}": rng.gauss(1.0, 0.2) for i in range(5)}
    b = {f"b{i}": rng.gauss(1.3, 0.5) for i in range(4)}
    d = difference(a, b)
    want = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    assert not d.paired and (d.low, d.high) == pytest.approx((want.low, want.high), rel=1e-9)


def test_the_mean_interval_is_the_one_sample_t_interval():
    values = [0.3, 0.5, 0.45, 0.2, 0.41]
    s = summarize(values)
    want = stats.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (s.low, s.high) == pytest.approx((want.low, want.high), rel=1e-9)
    assert s.std == pytest.approx(stats.tstd(values))


def fake_runs(differences: list[float]) -> list[Run]:
    """Seeds whose baselines spread far more (sd 0.5) than the given per-seed differences of rho1."""
    rng = random.Random(2)
    runs = []
    for seed, diff in enumerate(differences):
        base = 2.0 + rng.gauss(0, 0.5)
        for algorithm, value in (("baseline-mtp", base), ("rho1", base + diff)):
            runs.append(Run(f"{algorithm}-s{seed}", {"recipe.algorithm": algorithm, "config.compute.seed": str(seed)},
                            {"val/loss": {10: value + 1, 20: value}}))
    return runs


def test_verdicts_follow_the_interval_and_nothing_else():
    clear = compare(fake_runs([-0.21, -0.18, -0.2, -0.22, -0.19]), ["algorithm"], ["val/loss"], None)
    clear = clear["metrics"]["val/loss"]
    assert clear["rho1"]["vs_baseline"]["verdict"] == "lower than baseline (95% interval excludes 0)"
    assert clear["rho1"]["vs_baseline"]["lower"] == 5
    # a mean difference of −0.1 with 3 of 5 seeds lower: the interval holds 0, and the report says so
    noisy = compare(fake_runs([-0.9, 0.5, -0.3, 0.6, -0.4]), ["algorithm"], ["val/loss"], None)
    noisy = noisy["metrics"]["val/loss"]
    assert noisy["rho1"]["vs_baseline"]["mean"] == pytest.approx(-0.1)
    assert noisy["rho1"]["vs_baseline"]["verdict"] == "not distinguishable from baseline at 95%"
    assert noisy["baseline-mtp"].get("vs_baseline") is None
    with pytest.raises(ConfigError, match="no run logged it"):
        compare(fake_runs([0.1, 0.2]), ["algorithm"], ["val/acc"], None)
    with pytest.raises(ConfigError, match="no parameter `recipe.nope`"):
        compare(fake_runs([0.1, 0.2]), ["nope"], ["val/loss"], None)


def test_compare_reads_run_directories_and_mlflow_alike(tmp_path, capsys):
    recipe = {"train": {"max_steps": 3, "eval_every": 1}}
    config = {"mlflow": {"enabled": True, "experiment": "compare-test"}}
    for seed in (0, 1):
        for algorithm in ("baseline-mtp", "gradnorm"):
            run_recipe = {**recipe, "algorithm": algorithm}
            run_config = {**config, "compute": {"device": "cpu", "seed": seed}}
            assert main(train_args(tmp_path, f"{algorithm}-s{seed}", config=run_config, recipe=run_recipe)) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["compare", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gradnorm | 2 |" in printed and "baseline: baseline-mtp" in printed
    result = json.loads((out / "compare.json").read_text())
    loss = result["metrics"]["val/loss"]
    assert set(loss) == {"baseline-mtp", "gradnorm"} and loss["gradnorm"]["vs_baseline"]["paired"]
    assert {"val/ce_head0", "val/ce_head1", "val/ce_head2"} <= set(result["metrics"])  # per head, not only the mean
    # the final value is the run's last logged validation loss
    lines = [json.loads(x) for x in (tmp_path / "runs" / "gradnorm-s1" / "metrics.jsonl").read_text().splitlines()]
    last = [x["val/loss"] for x in lines if "val/loss" in x][-1]
    assert loss["gradnorm"]["values"]["1"] == pytest.approx(last)
    assert (out / "curve_val_loss.png").stat().st_size > 1000
    assert "curve_val_loss.png" in (out / "report.md").read_text()
    # the same runs read from MLflow give the same numbers
    store = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert main(["compare", "mlflow:compare-test", "--tracking-uri", store, "--out", str(tmp_path / "m")]) == 0
    from_mlflow = json.loads((tmp_path / "m" / "compare.json").read_text())["metrics"]["val/loss"]
    for group in loss:
        assert from_mlflow[group]["values"] == pytest.approx(loss[group]["values"])
    assert main(["compare", str(tmp_path / "nothing-here")]) == 1
    assert "not a run directory" in capsys.readouterr().err
