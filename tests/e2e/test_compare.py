"""`wmtp compare`: the intervals against scipy's own tests, verdicts that follow the intervals only, and the command
on real tiny runs read from their directories and from MLflow."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers.tiny_run import train_args
from scipy import stats

from wmtp.cli import main
from wmtp.config import ConfigError, Tracking
from wmtp.evaluate.compare import SEED_KEY, Run, compare, difference, read_run_dir, summarize
from wmtp.runtime.tracking import Tracker


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
    assert [v["value"] for v in loss["gradnorm"]["values"] if v["run"] == "gradnorm-s1"] == pytest.approx([last])
    assert (out / "curve_val_loss.png").stat().st_size > 1000
    assert min(read_run_dir(tmp_path / "runs" / "gradnorm-s1").curve("val/loss")) == 0  # the validation before step 1
    assert "curve_val_loss.png" in (out / "report.md").read_text()
    # the same runs read from MLflow give the same numbers
    store = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert main(["compare", "mlflow:compare-test", "--tracking-uri", store, "--out", str(tmp_path / "m")]) == 0
    from_mlflow = json.loads((tmp_path / "m" / "compare.json").read_text())["metrics"]["val/loss"]
    for group in loss:
        mine, theirs = ([(v["run"], v["seed"], v["value"]) for v in g[group]["values"]] for g in (loss, from_mlflow))
        assert [v[:2] for v in theirs] == [v[:2] for v in mine]
        assert [v[2] for v in theirs] == pytest.approx([v[2] for v in mine])
    assert main(["compare", str(tmp_path / "nothing-here")]) == 1
    assert "not a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ every run counted
def record_run(root: Path, name: str, params: dict[str, str], history: dict[int, dict[str, float]], *,
               store: str | None = None, experiment: str = "compare-seeds") -> None:
    """A run recorded as training records it (run.json and metrics.jsonl, MLflow too when `store` is given)."""
    tracker = Tracker(Tracking(enabled=store is not None, tracking_uri=store, experiment=experiment), root, name,
                      active=True, record_dir=root / name)
    tracker.log_params(params)
    for step, metrics in sorted(history.items()):
        tracker.log_metrics(metrics, step)
    tracker.end()


def params(algorithm: str, seed: int, lr: float = 3e-3) -> dict[str, str]:
    return {"recipe.algorithm": algorithm, "config.compute.seed": str(seed), "recipe.optim.lr": str(lr)}


# an lr sweep of the baseline at seed 0 (three runs), one baseline run at seed 1, and rho1 at seeds 0 and 1
SWEEP = {"baseline-lr1e-3-s0": (params("baseline-mtp", 0, 1e-3), 2.31),
         "baseline-s0": (params("baseline-mtp", 0), 2.12),
         "baseline-lr1e-2-s0": (params("baseline-mtp", 0, 1e-2), 2.47),
         "baseline-s1": (params("baseline-mtp", 1), 2.18),
         "rho1-s0": (params("rho1", 0), 2.02),
         "rho1-s1": (params("rho1", 1), 2.09)}


def test_runs_of_one_group_that_share_a_seed_are_all_counted(tmp_path, capsys):
    for name, (run_params, final) in SWEEP.items():
        record_run(tmp_path / "runs", name, run_params, {0: {"val/loss_initial": 5.0}, 10: {"val/loss": final}})
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    loss = json.loads((tmp_path / "report" / "compare.json").read_text())["metrics"]["val/loss"]
    baseline = [v for name, (p, v) in SWEEP.items() if p["recipe.algorithm"] == "baseline-mtp"]
    assert loss["baseline-mtp"]["n"] == 4 and loss["baseline-mtp"]["mean"] == pytest.approx(sum(baseline) / 4)
    assert sorted(v["run"] for v in loss["baseline-mtp"]["values"]) == sorted(n for n in SWEEP if "baseline" in n)
    assert "| baseline-mtp | 4 |" in printed and "4 runs (seeds 0, 0, 0, 1)" in printed
    # four baseline runs cannot be paired with two rho1 runs by seed: Welch, and the report says why and how to pair
    vs = loss["rho1"]["vs_baseline"]
    want = stats.ttest_ind([2.02, 2.09], baseline, equal_var=False).confidence_interval(0.95)
    assert not vs["paired"] and tuple(vs["ci95"]) == pytest.approx((want.low, want.high), rel=1e-9)
    assert "seed 0 has 3 runs in baseline-mtp" in vs["unpaired_because"]
    assert "unpaired (Welch): seed 0 has 3 runs in baseline-mtp" in printed
    assert "differ in recipe.optim.lr" in printed and "--group-by algorithm,recipe.optim.lr" in printed
    # grouped as suggested, every group has one run per seed, and the differences are paired again
    assert main(["compare", str(tmp_path / "runs"), "--group-by", "algorithm,recipe.optim.lr",
                 "--baseline", "baseline-mtp 0.003"]) == 0
    assert "| rho1 0.003 | 2 | 2.0550 ± 0.0495 | [1.6103, 2.4997] | -0.0950 (paired) |" in capsys.readouterr().out


def test_differences_are_paired_only_over_one_run_per_seed_and_the_same_seeds():
    def runs(group: dict[str, list[int]]) -> list[Run]:
        return [Run(f"{algorithm}-{i}", {"recipe.algorithm": algorithm, SEED_KEY: str(seed)},
                    {"val/loss": {5: 2.0 + 0.1 * seed + (0.05 if algorithm == "rho1" else 0) + 0.01 * i}})
                for algorithm, seeds in group.items() for i, seed in enumerate(seeds)]

    same = compare(runs({"baseline-mtp": [0, 1, 2], "rho1": [0, 1, 2]}), ["algorithm"], ["val/loss"], None)
    assert same["metrics"]["val/loss"]["rho1"]["vs_baseline"]["paired"]
    # rho1's seed 2 has no baseline partner: pairing over seeds 0 and 1 alone would drop a run from the difference
    extra = compare(runs({"baseline-mtp": [0, 1], "rho1": [0, 1, 2]}), ["algorithm"], ["val/loss"], None)
    vs = extra["metrics"]["val/loss"]["rho1"]["vs_baseline"]
    assert not vs["paired"] and vs["unpaired_because"] == "the seeds differ (rho1: 0, 1, 2; baseline-mtp: 0, 1)"
    repeated = compare(runs({"baseline-mtp": [0, 1], "rho1": [0, 0, 1, 1]}), ["algorithm"], ["val/loss"], None)
    vs = repeated["metrics"]["val/loss"]["rho1"]["vs_baseline"]
    assert not vs["paired"] and vs["unpaired_because"] == "seed 0 has 2 runs, seed 1 has 2 runs in rho1"
    assert repeated["metrics"]["val/loss"]["rho1"]["n"] == 4


def test_mlflow_runs_that_share_a_seed_are_all_counted(tmp_path, capsys):
    store = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    # two baseline runs at seed 0, the older one stopped before its first evaluation: it never logged val/acc
    record_run(tmp_path / "runs", "baseline-stopped-s0", params("baseline-mtp", 0), {1: {"train/loss": 4.0}},
               store=store)
    record_run(tmp_path / "runs", "baseline-s0", params("baseline-mtp", 0), {1: {"train/loss": 4.1},
                                                                             10: {"val/acc": 0.25}}, store=store)
    assert main(["compare", "mlflow:compare-seeds", "--tracking-uri", store, "--metric", "val/acc",
                 "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    acc = json.loads((tmp_path / "report" / "compare.json").read_text())["metrics"]["val/acc"]["baseline-mtp"]
    assert acc["n"] == 1 and acc["values"] == [{"run": "baseline-s0", "seed": "0", "value": 0.25}]
    assert acc["missing"] == ["baseline-stopped-s0"] and "not logged by baseline-stopped-s0" in printed
    assert "2 runs (seeds 0, 0)" in printed


def test_a_run_given_twice_is_refused(tmp_path, capsys):
    store = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    for name in ("baseline-s0", "baseline-s1"):
        record_run(tmp_path / "runs", name, params("baseline-mtp", int(name[-1])), {10: {"val/loss": 2.0}},
                   store=store)
    runs = str(tmp_path / "runs")
    assert main(["compare", runs, f"{runs}/baseline-s1"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"run baseline-s1 is given twice ({runs}/baseline-s1 and "
                                                    f"{runs}/baseline-s1): pass each run once")
    # a run directory and the MLflow run it logged to are one run
    assert main(["compare", f"{runs}/baseline-s0", "mlflow:compare-seeds", "--tracking-uri", store]) == 1
    assert "run baseline-s0 is given twice" in capsys.readouterr().err


def test_compare_does_not_write_over_another_commands_output(tmp_path, capsys):
    record_run(tmp_path / "runs", "baseline-s0", params("baseline-mtp", 0), {10: {"val/loss": 2.0}})
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "results.json").write_text("{}")
    (evaluation / "report.md").write_text("# an evaluation\n")
    assert main(["compare", str(tmp_path / "runs"), "--out", str(evaluation)]) == 1
    assert f"--out {evaluation}: holds files that wmtp compare did not write (results.json)" in capsys.readouterr().err
    assert (evaluation / "report.md").read_text() == "# an evaluation\n"
    # its own output it may refresh
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0


# ------------------------------------------------------------------------------------------------ learning curves
def test_learning_curves_start_at_step_0_with_markers_and_say_what_the_band_is():
    from matplotlib.transforms import Bbox

    from wmtp.evaluate import compare as comparison

    runs = [Run(f"{a}-s{seed}", {"recipe.algorithm": a, SEED_KEY: str(seed)},
                {"val/loss_initial": {0: 5.0 + seed}, "val/loss": {10: 3.0 + seed, 20: 2.0 + seed}})
            for a in ("baseline-mtp", "rho1") for seed in (0, 1)]
    fig = comparison.curve_figure(runs, ["algorithm"], "val/loss")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"baseline-mtp (n=2)", "rho1 (n=2)"}
    for line in lines.values():
        assert line.get_marker() not in (None, "", "None")
        assert list(line.get_xdata()) == [0, 10, 20] and list(line.get_ydata()) == [5.5, 3.5, 2.5]
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "step 0: before training" in texts and "band: ±1 sample std over a group's runs" in texts
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not Bbox.intersection(legend, ax.get_window_extent(renderer))  # beside the data, not on it
    assert all(float(t).is_integer() for t in ax.get_xticks())
