"""`wmtp compare`: runs grouped (by algorithm, or any parameter), final metrics as mean ± std over seeds, paired
differences against a baseline group with 95% t intervals, learning curves, and a markdown report.

Runs come from run directories (their `run.json` and `metrics.jsonl`, written by every training run) or from an
MLflow experiment (`mlflow:<experiment>` with `--tracking-uri`). A run's final value of a metric is the value at its
last logged step. Statistics:
- per group: n, mean, sample std (n − 1), and the 95% t interval of the mean;
- against the baseline, when both groups have runs with the same seeds (`config.compute.seed`): the paired
  differences d_i = x_i − b_i over the shared seeds, their mean, std, 95% t interval (n − 1 degrees of freedom)
  and sign count; otherwise Welch's interval for the difference of means (Welch–Satterthwaite degrees of
  freedom), marked unpaired.
A difference is called lower or higher only when its 95% interval excludes 0; otherwise the report says "not
distinguishable from baseline at 95%". No other conclusion is printed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_file
from ..config import ConfigError
from ..tracking import METRICS_FILE, RUN_FILE

SEED_KEY = "config.compute.seed"
HEAD_METRIC = re.compile(r"^(?P<base>.+_head)(?P<head>\d+)$")


@dataclass
class Run:
    name: str
    params: dict[str, str]
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> step -> value
    status: str = "FINISHED"

    def final(self, metric: str) -> float | None:
        steps = self.history.get(metric)
        return steps[max(steps)] if steps else None

    @property
    def seed(self) -> str | None:
        return self.params.get(SEED_KEY)


# ------------------------------------------------------------------------------------------------ reading runs
def read_run_dir(path: Path) -> Run:
    record = path / RUN_FILE
    try:
        data = json.loads(record.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{record}: not valid JSON ({exc})") from None
    run = Run(name=data.get("name", path.name), params=data.get("params", {}), status=data.get("status", "?"))
    metrics = path / METRICS_FILE
    if metrics.is_file():
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row.pop("step"))
            except (json.JSONDecodeError, KeyError, ValueError):
                raise ConfigError(f"{metrics}:{number}: expected a JSON object with a `step`") from None
            for name, value in row.items():
                run.history.setdefault(name, {})[step] = float(value)  # a resumed run logs a step again: last wins
    return run


def read_mlflow(experiment: str, tracking_uri: str | None) -> list[Run]:
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"mlflow:{experiment}: no such experiment in {mlflow.get_tracking_uri()}")
    runs = []
    for info in client.search_runs([found.experiment_id], max_results=10_000):
        if info.data.tags.get("kind") == "evaluation":
            continue
        run = Run(name=info.info.run_name, params=dict(info.data.params), status=info.info.status)
        for name in info.data.metrics:
            run.history[name] = {m.step: m.value for m in client.get_metric_history(info.info.run_id, name)}
        runs.append(run)
    return runs


def collect(sources: list[str], tracking_uri: str | None) -> list[Run]:
    """Run directories, directories of run directories, and `mlflow:<experiment>`."""
    runs: list[Run] = []
    for source in sources:
        if source.startswith("mlflow:"):
            runs += read_mlflow(source[len("mlflow:"):], tracking_uri)
            continue
        path = Path(source)
        if (path / RUN_FILE).is_file():
            runs.append(read_run_dir(path))
        elif path.is_dir() and (inner := sorted(p for p in path.iterdir() if (p / RUN_FILE).is_file())):
            runs += [read_run_dir(p) for p in inner]
        else:
            raise ConfigError(f"{source}: not a run directory (no {RUN_FILE}), a directory of runs, or "
                              "mlflow:<experiment>")
    if not runs:
        raise ConfigError("no runs to compare")
    return runs


def group_label(run: Run, keys: list[str]) -> str:
    values = []
    for key in keys:
        if key == "name":  # the run name without a trailing seed (-s3, -seed3, _3)
            values.append(re.sub(r"[-_](s|seed)?\d+$", "", run.name))
            continue
        full = key if key.startswith(("config.", "recipe.")) else f"recipe.{key}"
        if full not in run.params:
            raise ConfigError(f"run {run.name}: has no parameter `{full}` to group by")
        values.append(run.params[full])
    return " ".join(values)


# ------------------------------------------------------------------------------------------------ statistics
def t_quantile(df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def summarize(values: list[float]) -> Summary:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass
class Difference:
    paired: bool
    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    lower: int | None = None  # paired: seeds where the group's value is below the baseline's
    higher: int | None = None

    @property
    def verdict(self) -> str:
        if self.low is None:
            return "too few runs for an interval"
        if self.low > 0:
            return "higher than baseline (95% interval excludes 0)"
        if self.high < 0:
            return "lower than baseline (95% interval excludes 0)"
        return "not distinguishable from baseline at 95%"


def difference(group: dict[str, float], baseline: dict[str, float]) -> Difference | None:
    """group, baseline: seed -> final value."""
    shared = sorted(set(group) & set(baseline))
    if len(shared) >= 2:
        d = [group[s] - baseline[s] for s in shared]
        s = summarize(d)
        return Difference(True, s.n, s.mean, s.std, s.low, s.high, sum(x < 0 for x in d), sum(x > 0 for x in d))
    a, b = list(group.values()), list(baseline.values())
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    diff = sa.mean - sb.mean
    if se == 0:
        return Difference(False, min(sa.n, sb.n), diff, 0.0, diff, diff)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = t_quantile(df) * se
    return Difference(False, min(sa.n, sb.n), diff, se, diff - half, diff + half)


# ------------------------------------------------------------------------------------------------ the comparison
def default_metrics(runs: list[Run], metric: str) -> list[str]:
    """The metric and, when it is val/loss, every val/ce_head<h> the runs logged (per head and the mean)."""
    names = [metric]
    if metric == "val/loss":
        heads = sorted({m for r in runs for m in r.history if HEAD_METRIC.match(m) and m.startswith("val/ce_head")},
                       key=lambda m: int(HEAD_METRIC.match(m)["head"]))
        names += heads
    return names


def compare(runs: list[Run], group_by: list[str], metrics: list[str], baseline: str | None) -> dict:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_label(run, group_by), []).append(run)
    if baseline is None:
        baseline = next((g for g in groups if "baseline" in g), sorted(groups)[0])
    if baseline not in groups:
        raise ConfigError(f"--baseline {baseline}: no such group (groups: {', '.join(sorted(groups))})")
    result = {"group_by": group_by, "baseline": baseline, "metrics": {}, "groups": {}}
    for label, members in sorted(groups.items()):
        result["groups"][label] = [{"name": r.name, "seed": r.seed, "status": r.status} for r in members]
    for metric in metrics:
        per_group = {}
        for label, members in sorted(groups.items()):
            values = {(r.seed if r.seed is not None else r.name): r.final(metric) for r in members}
            values = {k: v for k, v in values.items() if v is not None}
            if values:
                s = summarize(list(values.values()))
                per_group[label] = {"values": values, "n": s.n, "mean": s.mean, "std": s.std, "ci95": [s.low, s.high]}
        if not per_group:
            raise ConfigError(f"--metric {metric}: no run logged it")
        base = per_group.get(baseline)
        for label, entry in per_group.items():
            d = None if base is None or label == baseline else difference(entry["values"], base["values"])
            if d is not None:
                entry["vs_baseline"] = {"paired": d.paired, "n": d.n, "mean": d.mean, "std": d.std,
                                        "ci95": [d.low, d.high], "lower": d.lower, "higher": d.higher,
                                        "verdict": d.verdict}
        result["metrics"][metric] = per_group
    return result


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"# Comparison (grouped by {', '.join(result['group_by'])}; baseline: {result['baseline']})", ""]
    for label, members in result["groups"].items():
        seeds = ", ".join(str(m["seed"]) for m in members)
        lines.append(f"- **{label}**: {len(members)} runs (seeds {seeds})")
    for metric, groups in result["metrics"].items():
        lines += ["", f"## {metric} (final value)", "",
                  "| group | n | mean ± std | 95% CI of mean | Δ vs baseline (paired) | 95% CI of Δ | sign | reading |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, g in groups.items():
            v = g.get("vs_baseline")
            delta = "–" if v is None else f"{v['mean']:+.4f}" + ("" if v["paired"] else " (unpaired)")
            ci_d = "–" if v is None or v["ci95"][0] is None else f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
            sign = "–" if v is None or v["lower"] is None else f"{v['lower']} lower / {v['higher']} higher"
            reading = "baseline" if label == result["baseline"] else ("–" if v is None else v["verdict"])
            ci = "–" if g["ci95"][0] is None else f"[{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}]"
            lines.append(f"| {label} | {g['n']} | {_fmt(g['mean'])} ± {_fmt(g['std'])} | {ci} | {delta} | {ci_d} | "
                         f"{sign} | {reading} |")
    lines += ["", "Intervals: Student t over seeds (paired differences when the seeds match, Welch otherwise). "
              "A group is called lower or higher only when the 95% interval of its difference excludes 0.", ""]
    return "\n".join(lines)


def plot_curves(runs: list[Run], group_by: list[str], metric: str, target: Path) -> bool:
    """Mean ± std over each group's runs at every step that all of them logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Run]] = {}
    for run in runs:
        if metric in run.history:
            groups.setdefault(group_label(run, group_by), []).append(run)
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, members in sorted(groups.items()):
        steps = sorted(set.intersection(*(set(r.history[metric]) for r in members)))
        if not steps:
            continue
        values = [[r.history[metric][s] for r in members] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
               for v, m in zip(values, mean, strict=True)]
        ax.plot(steps, mean, label=f"{label} (n={len(members)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def run_compare(sources: list[str], *, group_by: list[str], metrics: list[str], baseline: str | None,
                out: Path | None, tracking_uri: str | None) -> tuple[dict, str]:
    runs = collect(sources, tracking_uri)
    names = [m for metric in metrics for m in default_metrics(runs, metric)]
    result = compare(runs, group_by, list(dict.fromkeys(names)), baseline)
    report = markdown(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "compare.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        plots = []
        for metric in result["metrics"]:
            target = out / f"curve_{metric.replace('/', '_')}.png"
            if plot_curves(runs, group_by, metric, target):
                plots.append(target.name)
        report += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
        with atomic_file(out / "report.md") as tmp:
            tmp.write_text(report)
    return result, report
