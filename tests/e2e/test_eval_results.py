"""What `wmtp eval`, `execute` and `report` write, and what they never overwrite: execute adds pass@k to the
evaluation whose generations it scores (results, report, its MLflow run); eval's help, its plan line, its
settings as MLflow params, the run's own config and recipe; the per-head chart."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import yaml
from helpers.tiny_run import files, train_args

from wmtp.cli import _parser, main

MBPP = Path(__file__).resolve().parents[2] / "data" / "mbpp"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("evalresults")
    overrides = {"config": {"datasets": {"mbpp": str(MBPP)}}}
    assert main(train_args(tmp, **overrides)) == 0
    config, recipe = files(tmp, **overrides)
    return config, recipe, tmp / "runs" / "run" / "final"


def tracked_config(trained, tmp_path: Path) -> Path:
    """The test config with MLflow on, in a sqlite store of its own."""
    settings = yaml.safe_load(trained[0].read_text())
    settings["mlflow"] = {"enabled": True, "experiment": "evals", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    settings["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def a_run(trained, tmp_path: Path, name: str = "myrun", *, config: bool = True, recipe: bool = True) -> Path:
    """A copy of the trained run's final model in `<tmp>/runs/<name>/final`, with the run's config.yaml and
    recipe.yaml (as training writes them) where asked for, and without them where not."""
    run = tmp_path / "runs" / name
    shutil.copytree(trained[2], run / "final")
    for wanted, source, target in ((config, trained[0], "config.yaml"), (recipe, trained[1], "recipe.yaml")):
        if wanted:
            shutil.copyfile(source, run / target)
        else:
            (run / target).unlink(missing_ok=True)
    return run


def eval_args(config: Path, recipe: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--config", str(config), "--recipe", str(recipe), "--checkpoint", str(checkpoint),
            "--benchmarks", "mbpp,humaneval", "--limit", "2", "--max-new-tokens", "8", "--out", str(out), *extra]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def mlflow_run(results: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(results["tracking_uri"]).get_run(results["mlflow_run_id"])


def test_execute_as_eval_hints_adds_passk_to_that_evaluation(trained, tmp_path, capsys):
    """eval without --allow-code-execution, then exactly the command its hint prints: results.json keeps every key
    and gains the measured pass@k, report.md keeps head quality and speculative and gains pass@k, and the
    evaluation's own MLflow run receives the pass@k metrics."""
    out = tmp_path / "ev"
    assert main(eval_args(tracked_config(trained, tmp_path), trained[1], trained[2], out,
                          "--speculative-prompts", "2", "--k", "1")) == 0
    before = json.loads((out / "results.json").read_text())
    hint = re.search(r"run `wmtp (execute [^`]+)`", capsys.readouterr().out)
    assert hint is not None and before["passk"]["benchmarks"] == {}
    assert main(shlex.split(hint.group(1))) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    assert set(before) <= set(after) and {"checkpoint", "device", "precision", "dtype", "processes", "generations",
                                          "heads", "speculative", "mlflow_run_id", "tracking_uri"} <= set(after)
    assert {k: v for k, v in after.items() if k != "passk"} == {k: v for k, v in before.items() if k != "passk"}
    assert set(after["passk"]["benchmarks"]) == {"mbpp", "humaneval"}
    assert after["passk"]["generation"] == before["passk"]["generation"]  # eval's throughput figures kept
    report = (out / "report.md").read_text()
    assert "## pass@k" in report and "Head quality" in report and "Self-speculative" in report
    assert f"added pass@k to the evaluation in {out}" in printed
    run = mlflow_run(after)
    assert run.data.metrics["eval/mbpp/pass_at_1"] == after["passk"]["benchmarks"]["mbpp"]["pass@k"]["pass@1"]["mean"]
    assert "eval/ce_head0" in run.data.metrics and "eval/acceptance_head1" in run.data.metrics  # eval's own run


def test_execute_never_touches_a_scored_evaluation_or_one_it_was_not_pointed_at(trained, tmp_path, capsys):
    """An evaluation that already holds measured pass@k, or an --out elsewhere: execute writes a directory of
    its own, says where, and leaves every file of the evaluation as it was; an --out that holds results is
    refused."""
    out = tmp_path / "ev"
    assert main(eval_args(trained[0], trained[1], trained[2], out, "--speculative-prompts", "0", "--k", "1")) == 0
    generations = out / "generations.jsonl"
    elsewhere = tmp_path / "elsewhere"
    untouched = snapshot(out)
    assert main(["execute", str(generations), "--allow-code-execution", "--k", "1", "--out", str(elsewhere)]) == 0
    assert snapshot(out) == untouched and (elsewhere / "results.json").is_file()
    assert f"results: {elsewhere / 'results.json'}" in capsys.readouterr().out
    assert main(["execute", str(generations), "--allow-code-execution", "--k", "1"]) == 0  # adds to the eval
    scored = snapshot(out)
    assert scored != untouched
    capsys.readouterr()
    assert main(["execute", str(generations), "--allow-code-execution", "--k", "1"]) == 0
    assert snapshot(out) == scored
    (own,) = out.glob("execute-*")
    assert f"results: {own / 'results.json'}" in capsys.readouterr().out
    assert json.loads((own / "results.json").read_text())["passk"]["benchmarks"]
    assert main(["execute", str(generations), "--allow-code-execution", "--out", str(elsewhere)]) == 1
    assert "--out" in capsys.readouterr().err and snapshot(out) == scored
    assert main(eval_args(trained[0], trained[1], trained[2], out, "--no-heads", "--speculative-prompts", "0")) == 1
    assert "already holds results.json" in capsys.readouterr().err and snapshot(out) == scored


def test_eval_and_execute_help_show_every_default():
    """Every option of `wmtp eval` and `wmtp execute` that has a default says it in --help."""
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in ("eval", "execute", "report"):
        parser = sub.choices[name]
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
                shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                option = action.option_strings[-1]
                assert re.search(rf"{re.escape(option)}\b.*?\(default: {re.escape(str(shown))}\)", text), (name, option)


def test_eval_says_what_it_generates_before_it_does(trained, tmp_path, capsys):
    assert main(eval_args(trained[0], trained[1], trained[2], tmp_path / "ev", "--no-heads",
                          "--speculative-prompts", "0", "--samples", "2", "--temperature", "0.7")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("generating for mbpp (2 problems), humaneval (2 problems): 2 samples per problem, temperature "
                     "0.7, top-p 1.0, at most 8 new tokens, prompt format raw")


def test_eval_takes_the_config_and_recipe_from_the_run(trained, tmp_path, capsys):
    """Without --config / --recipe, a checkpoint's run supplies its config.yaml and recipe.yaml; without a
    recipe, head quality is skipped with the reason (never a number); without a config, a one-line error."""
    run = a_run(trained, tmp_path)
    args = ["eval", "--checkpoint", str(run / "final"), "--benchmarks", "humaneval", "--limit", "1",
            "--max-new-tokens", "4", "--speculative-prompts", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert [h["head"] for h in json.loads((tmp_path / "a" / "results.json").read_text())["heads"]["heads"]] == [0, 1, 2]
    capsys.readouterr()
    (run / "recipe.yaml").unlink()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "heads" not in results and "no --recipe" in results["heads_skipped"]
    assert "head quality skipped: no --recipe" in capsys.readouterr().out
    assert "not measured (no --recipe" in (tmp_path / "b" / "report.md").read_text()
    (run / "config.yaml").unlink()
    assert main([*args, "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "--config" in err and "config.yaml" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--benchmarks", "humaneval"]) == 1
    assert "--config" in capsys.readouterr().err


def test_a_remote_checkpoint_brings_its_run_config_and_recipe(trained, tmp_path, s3, capsys):
    """--checkpoint s3://.../<run>/final without --config / --recipe: the run's files are read from the store."""
    client, bucket = s3
    run = a_run(trained, tmp_path)
    for path in run.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/myrun/{path.relative_to(run).as_posix()}")
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", f"s3://{bucket}/runs/myrun/final", "--benchmarks", "humaneval", "--limit",
                 "1", "--max-new-tokens", "4", "--speculative-prompts", "0", "--out", str(out)]) == 0
    assert "(the checkpoint's run's own)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["heads"]["heads"]
    client.delete_object(Bucket=bucket, Key="runs/myrun/config.yaml")
    assert main(["eval", "--checkpoint", f"s3://{bucket}/runs/myrun/final", "--out", str(tmp_path / "x")]) == 1
    assert f"s3://{bucket}/runs/myrun holds no config.yaml" in capsys.readouterr().err


def test_eval_mlflow_run_carries_its_settings_and_is_labelled_by_run_name(trained, tmp_path):
    run = a_run(trained, tmp_path)
    out = run / "eval-x"
    assert main(eval_args(tracked_config(trained, tmp_path), trained[1], run / "final", out, "--no-heads",
                          "--speculative-prompts", "0", "--k", "1", "--split", "validation")) == 0
    results = json.loads((out / "results.json").read_text())
    params = mlflow_run(results).data.params
    assert {k: params[k] for k in ("benchmarks", "split", "limit", "samples", "temperature", "top_p",
                                   "max_new_tokens", "batch_size", "prompt_format", "checkpoint")} == {
        "benchmarks": "mbpp,humaneval", "split": "validation", "limit": "2", "samples": "1", "temperature": "0.0",
        "top_p": "1.0", "max_new_tokens": "8", "batch_size": "16", "prompt_format": "raw",
        "checkpoint": str(run / "final")}
    assert mlflow_run(results).info.run_name == "myrun/eval-x"
    assert "- **myrun**:" in (out / "report.md").read_text()


def test_acceptance_per_depth_reads_back_from_metrics_jsonl_and_results_json(trained, tmp_path, capsys):
    """Training's last validation (at the final step) and `wmtp eval` of the final model on the same held-out text
    measure the same teacher-forced acceptance: metrics.jsonl's val/acceptance_head<k> and val/tokens_per_forward
    equal results.json's counts; report.md and the summary line show them."""
    lines = [json.loads(x) for x in (trained[2].parent / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in lines if "val/loss" in m][-1]
    out = tmp_path / "ev"
    assert main(eval_args(trained[0], trained[1], trained[2], out, "--benchmarks", "")) == 0
    printed = capsys.readouterr().out
    acceptance = json.loads((out / "results.json").read_text())["heads"]["acceptance"]
    rates = [d["accepted"] / d["eligible"] for d in acceptance["depths"]]
    assert [d["depth"] for d in acceptance["depths"]] == [1, 2] and all(d["eligible"] for d in acceptance["depths"])
    assert [last["val/acceptance_head1"], last["val/acceptance_head2"]] == pytest.approx(rates)
    expected = 1 + rates[0] + rates[0] * rates[1]
    assert last["val/tokens_per_forward"] == pytest.approx(expected) == acceptance["tokens_per_forward"]
    assert f"by depth: 1 {rates[0]:.3f}, 2 {rates[1]:.3f}; expected tokens per forward {expected:.3f}" in printed
    report = (out / "report.md").read_text()
    assert "## Teacher-forced acceptance against head 0" in report
    assert f"{rates[0]:.3f} ({acceptance['depths'][0]['accepted']}/{acceptance['depths'][0]['eligible']})" in report


def test_head_accuracy_chart_has_integer_ticks_grouped_bars_and_a_legend_off_the_data():
    from wmtp.evaluate.report import head_accuracy_figure

    def heads(accs):
        return {"heads": [{"head": h, "acc": a} for h, a in enumerate(accs)],
                "buckets": [{"positions": [0, 16], "heads": [{"acc": a} for a in accs]}]}

    fig = head_accuracy_figure(["base", "rho1", "mtp"], [heads([0.5, 0.3, 0.2, 0.1]), heads([0.6, 0.4, None, 0.2]),
                                                         heads([0.55, 0.35, 0.25, 0.15])])
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    bars = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches]
    assert len(bars) == 11  # rho1's head 2 is missing: no bar, not a zero
    for h in range(4):
        group = sorted(x for x, _ in bars if abs(x - h) < 0.45)
        assert len(group) == (2 if h == 2 else 3) and all(b - a > 0.1 for a, b in pairwise(group))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axes in fig.axes:
        legend = axes.get_legend()
        assert legend is not None and not legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))


def test_a_zero_of_n_pass_at_1_is_shown_with_an_interval_that_does_not_collapse():
    from wmtp.cli import _passk_lines
    from wmtp.evaluate.passk import summarize
    from wmtp.evaluate.report import pass_cell

    records = [{"benchmark": "humaneval", "task_id": f"t{i}", "sample": 0, "passed": False} for i in range(20)]
    entry = summarize(records, [1])["benchmarks"]["humaneval"]["pass@k"]["pass@1"]
    assert pass_cell(entry) == "0.0 [0.0, 0.0] W[0.0, 16.1]"
    lines = _passk_lines({"passk": summarize(records, [1])})
    assert lines[0] == "humaneval: 20 problems, n=1: pass@1 0.0 [0.0, 0.0] W[0.0, 16.1]" and "Wilson" in lines[1]
