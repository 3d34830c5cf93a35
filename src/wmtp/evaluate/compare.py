"""`wmtp compare`: runs grouped (by algorithm, or any parameter), final metrics as mean ± std over each group's
runs, differences against a baseline group with 95% t intervals, learning curves, and a markdown report.

Runs come from run directories (their `run.json` and `metrics.jsonl`, written by every training run) or from an
MLflow experiment (`mlflow:<experiment>` with `--tracking-uri`). A run's final value of a metric is the value at its
last logged step. Every run is counted, also runs of one group that share a seed (a sweep under `--group-by
algorithm`); a run given twice is refused. Statistics:
- per group: n (the runs that logged the metric), mean, sample std (n − 1), and the 95% t interval of the mean;
- against the baseline, when both groups have one run per seed (`config.compute.seed`) and the same seeds: the
  paired differences d_i = x_i − b_i, their mean, std, 95% t interval (n − 1 degrees of freedom) and sign count;
  otherwise Welch's interval for the difference of means (Welch–Satterthwaite degrees of freedom), marked as
  such with the reason, and for runs that share a seed the parameters that tell them apart.
A difference is called lower or higher only when its 95% interval excludes 0; otherwise the report says "not
distinguishable from baseline at 95%". No other conclusion is printed.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..runtime.atomic import atomic_file
from ..runtime.tracking import METRICS_FILE, RUN_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEED_KEY = "config.compute.seed"
HEAD_METRIC = re.compile(r"^(?P<base>.+_head)(?P<head>\d+)$")


@dataclass
class Run:
    name: str
    params: dict[str, str]
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> step -> value
    status: str = "FINISHED"
    source: str = ""  # where it was read: its directory, or mlflow:<experiment>
    ids: tuple[str, ...] = ()  # what names it in any source: its resolved directory, its MLflow run id

    def final(self, metric: str) -> float | None:
        steps = self.history.get(metric)
        return steps[max(steps)] if steps else None

    def curve(self, metric: str) -> dict[int, float]:
        """step -> value, with the validation before training (logged as `<metric>_initial`) as step 0."""
        return {**self.history.get(f"{metric}_initial", {}), **self.history.get(metric, {})}

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
    ids = (str(path.resolve()), *([data["mlflow_run_id"]] if data.get("mlflow_run_id") else []))
    run = Run(name=data.get("name", path.name), params=data.get("params", {}), status=data.get("status", "?"),
              source=str(path), ids=ids)
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
        run = Run(name=info.info.run_name, params=dict(info.data.params), status=info.info.status,
                  source=f"mlflow:{experiment}", ids=(info.info.run_id,))
        for name in info.data.metrics:
            run.history[name] = {m.step: m.value for m in client.get_metric_history(info.info.run_id, name)}
        runs.append(run)
    return runs


def collect(sources: list[str], tracking_uri: str | None) -> list[Run]:
    """Run directories, directories of run directories, and `mlflow:<experiment>`; each run once."""
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
    refuse_repeats(runs)
    return runs


def refuse_repeats(runs: list[Run]) -> None:
    """A run named twice (a directory and its parent, or a directory and the MLflow run it logged to) would be
    counted twice: n and the intervals would be wrong."""
    seen: dict[str, Run] = {}
    for run in runs:
        for key in run.ids:
            if key in seen:
                raise ConfigError(f"run {run.name} is given twice ({seen[key].source} and {run.source}): pass each "
                                  "run once")
            seen[key] = run


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


def paired_difference(group: dict[str, float], baseline: dict[str, float]) -> Difference:
    """group, baseline: seed -> final value, over the same seeds (at least 2)."""
    d = [group[s] - baseline[s] for s in sorted(group)]
    s = summarize(d)
    return Difference(True, s.n, s.mean, s.std, s.low, s.high, sum(x < 0 for x in d), sum(x > 0 for x in d))


def welch_difference(group: list[float], baseline: list[float]) -> Difference | None:
    """Welch's interval for mean(group) − mean(baseline); None with fewer than 2 values on a side."""
    if len(group) < 2 or len(baseline) < 2:
        return None
    sa, sb = summarize(group), summarize(baseline)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    diff = sa.mean - sb.mean
    if se == 0:
        return Difference(False, min(sa.n, sb.n), diff, 0.0, diff, diff)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = t_quantile(df) * se
    return Difference(False, min(sa.n, sb.n), diff, se, diff - half, diff + half)


def difference(group: dict[str, float], baseline: dict[str, float]) -> Difference | None:
    """group, baseline: seed -> final value, one run per seed. Paired when both hold the same seeds (at least 2);
    otherwise Welch's, because pairing over the shared seeds alone would leave runs out of the difference."""
    if set(group) == set(baseline) and len(group) >= 2:
        return paired_difference(group, baseline)
    return welch_difference(list(group.values()), list(baseline.values()))


# ------------------------------------------------------------------------------------------------ seeds
def seed_order(seed: str | None) -> tuple[int, int, str]:
    """Seeds in numeric order; a missing seed last."""
    if seed is None:
        return 2, 0, ""
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def unpaired_because(label: str, values: list[dict], base_label: str, base_values: list[dict]) -> str | None:
    """Why a group's final values cannot be paired with the baseline's by seed; None when they can.
    values: [{"run", "seed", "value"}] of the runs that logged the metric."""
    for name, vals in ((label, values), (base_label, base_values)):
        unseeded = [v["run"] for v in vals if v["seed"] is None]
        if unseeded:
            return f"{', '.join(unseeded)} {'has' if len(unseeded) == 1 else 'have'} no {SEED_KEY}"
        counts = Counter(v["seed"] for v in vals)
        repeated = [f"seed {s} has {counts[s]} runs" for s in sorted(counts, key=seed_order) if counts[s] > 1]
        if repeated:
            return f"{', '.join(repeated)} in {name}"
    seeds, base_seeds = ({v["seed"] for v in vals} for vals in (values, base_values))
    if seeds != base_seeds:
        mine, theirs = (", ".join(sorted(x, key=seed_order)) for x in (seeds, base_seeds))
        return f"the seeds differ ({label}: {mine}; {base_label}: {theirs})"
    return None


def differing_params(runs: list[Run]) -> list[str]:
    """The recipe parameters (else the config parameters) whose values differ among runs: what tells them apart."""
    keys = sorted({k for r in runs for k in r.params} - {SEED_KEY})
    differ = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    recipe = [k for k in differ if k.startswith("recipe.")]
    return recipe or differ


def seed_note(members: list[Run], group_by: list[str]) -> str | None:
    """For a group whose runs share seeds: which runs, what tells them apart, and the grouping that pairs them."""
    by_seed: dict[str | None, list[Run]] = {}
    for run in members:
        by_seed.setdefault(run.seed, []).append(run)
    shared = {seed: rs for seed, rs in sorted(by_seed.items(), key=lambda s: seed_order(s[0])) if len(rs) > 1}
    if not shared:
        return None
    listed = "; ".join(f"seed {seed} has {len(rs)} runs ({', '.join(r.name for r in rs)})"
                       for seed, rs in shared.items())
    keys = differing_params([r for rs in shared.values() for r in rs])
    if not keys:
        return f"{listed}, with the same parameters: repeats, compared unpaired"
    return f"{listed}, which differ in {', '.join(keys)}: to pair by seed, `--group-by {','.join(group_by + keys)}`"


# ------------------------------------------------------------------------------------------------ the comparison
def default_metrics(runs: list[Run], metric: str) -> list[str]:
    """The metric and, when it is val/loss, every val/ce_head<h> the runs logged (per head and the mean)."""
    names = [metric]
    if metric == "val/loss":
        heads = sorted({m for r in runs for m in r.history if HEAD_METRIC.match(m) and m.startswith("val/ce_head")},
                       key=lambda m: int(HEAD_METRIC.match(m)["head"]))
        names += heads
    return names


def grouped(runs: list[Run], group_by: list[str]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_label(run, group_by), []).append(run)
    return dict(sorted(groups.items()))


def final_values(members: list[Run], metric: str) -> tuple[list[dict], list[str]]:
    """[{"run", "seed", "value"}] of every run that logged the metric (by seed, then name), and the runs that did
    not."""
    finals = [(r, r.final(metric)) for r in members]
    values = [{"run": r.name, "seed": r.seed, "value": v} for r, v in finals if v is not None]
    values.sort(key=lambda v: (seed_order(v["seed"]), v["run"]))
    return values, [r.name for r, v in finals if v is None]


def against_baseline(label: str, entry: dict, baseline: str, base: dict) -> dict | None:
    """The difference of a group's final values from the baseline's: paired by seed where both groups have one
    run per seed and the same seeds, Welch's otherwise (with the reason)."""
    why = unpaired_because(label, entry["values"], baseline, base["values"])
    if why is None:
        d = difference(*({v["seed"]: v["value"] for v in e["values"]} for e in (entry, base)))
    else:
        d = welch_difference(*([v["value"] for v in e["values"]] for e in (entry, base)))
    if d is None:
        return None
    return {"paired": d.paired, "unpaired_because": why, "n": d.n, "mean": d.mean, "std": d.std,
            "ci95": [d.low, d.high], "lower": d.lower, "higher": d.higher, "verdict": d.verdict}


def compare(runs: list[Run], group_by: list[str], metrics: list[str], baseline: str | None) -> dict:
    """Every run counted: per group and metric, the final values of all runs that logged it."""
    groups = grouped(runs, group_by)
    if baseline is None:
        baseline = next((g for g in groups if "baseline" in g), next(iter(groups)))
    if baseline not in groups:
        raise ConfigError(f"--baseline {baseline}: no such group (groups: {', '.join(groups)})")
    result = {"group_by": group_by, "baseline": baseline, "metrics": {}, "groups": {}, "notes": {}}
    for label, members in groups.items():
        result["groups"][label] = [{"name": r.name, "seed": r.seed, "status": r.status}
                                   for r in sorted(members, key=lambda r: (seed_order(r.seed), r.name))]
        if note := seed_note(members, group_by):
            result["notes"][label] = note
    for metric in metrics:
        per_group = {}
        for label, members in groups.items():
            values, missing = final_values(members, metric)
            if values:
                s = summarize([v["value"] for v in values])
                per_group[label] = {"values": values, "missing": missing, "n": s.n, "mean": s.mean, "std": s.std,
                                    "ci95": [s.low, s.high]}
        if not per_group:
            raise ConfigError(f"--metric {metric}: no run logged it")
        base = per_group.get(baseline)
        for label, entry in per_group.items():
            if base is not None and label != baseline and (vs := against_baseline(label, entry, baseline, base)):
                entry["vs_baseline"] = vs
        result["metrics"][metric] = per_group
    return result


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def group_lines(result: dict) -> list[str]:
    lines = []
    for label, members in result["groups"].items():
        seeds = ", ".join(str(m["seed"]) for m in members)
        unfinished = ", ".join(f"{m['name']} ({m['status']})" for m in members if m["status"] != "FINISHED")
        lines.append(f"- **{label}**: {len(members)} runs (seeds {seeds})" +
                     (f"; not finished: {unfinished}" if unfinished else "") +
                     (f"; {result['notes'][label]}" if label in result["notes"] else ""))
    return lines


def metric_lines(metric: str, groups: dict, baseline: str) -> list[str]:
    lines = ["", f"## {metric} (final value)", "",
             "| group | n | mean ± std | 95% CI of mean | Δ vs baseline | 95% CI of Δ | sign | reading |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for label, g in groups.items():
        v = g.get("vs_baseline")
        delta = "–" if v is None else f"{v['mean']:+.4f}" + (" (paired)" if v["paired"] else " (Welch)")
        ci_d = "–" if v is None or v["ci95"][0] is None else f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
        sign = "–" if v is None or v["lower"] is None else f"{v['lower']} lower / {v['higher']} higher"
        reading = "baseline" if label == baseline else ("–" if v is None else v["verdict"])
        ci = "–" if g["ci95"][0] is None else f"[{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}]"
        lines.append(f"| {label} | {g['n']} | {_fmt(g['mean'])} ± {_fmt(g['std'])} | {ci} | {delta} | {ci_d} | "
                     f"{sign} | {reading} |")
        if v is not None and not v["paired"]:
            notes.append(f"- {label} vs {baseline}: unpaired (Welch): {v['unpaired_because']}.")
        if g["missing"]:
            notes.append(f"- {label}: n counts the runs that logged {metric}; not logged by {', '.join(g['missing'])}.")
    return lines + ([""] + notes if notes else [])


def markdown(result: dict) -> str:
    lines = [f"# Comparison (grouped by {', '.join(result['group_by'])}; baseline: {result['baseline']})", "",
             *group_lines(result)]
    for metric, groups in result["metrics"].items():
        lines += metric_lines(metric, groups, result["baseline"])
    lines += ["", "Intervals: Student t over a group's runs. Differences from the baseline are paired by seed where "
              "both groups have one run per seed and the same seeds, Welch's otherwise. A group is called lower or "
              "higher only when the 95% interval of its difference excludes 0.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ learning curves
BAND = ("Line: mean over a group's runs at the steps all of them logged (step 0: before training); "
        "band: ±1 sample std over a group's runs")


def curve_points(members: list[Run], metric: str) -> tuple[list[int], list[float], list[float]]:
    """The steps every member logged, and the mean and sample std (0 for one run) over the members at each."""
    curves = [r.curve(metric) for r in members]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[s] for c in curves] for s in steps]
    mean = [sum(v) / len(v) for v in values]
    std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
           for v, m in zip(values, mean, strict=True)]
    return steps, mean, std


def curve_figure(runs: list[Run], group_by: list[str], metric: str) -> Figure | None:
    """One line per group (markers at the logged steps) with its ±1 std band, the legend beside the axes and the
    caption saying what line and band are; None when no run logged the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = grouped([r for r in runs if metric in r.history], group_by)
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    undrawn = []
    for label, members in groups.items():
        steps, mean, std = curve_points(members, metric)
        if not steps:
            undrawn.append(label)
            continue
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(members)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside the data, not on it
    caption = BAND + (f"; not drawn: {', '.join(undrawn)} (its runs share no logged step)" if undrawn else "")
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_curves(runs: list[Run], group_by: list[str], metric: str, target: Path) -> bool:
    """The metric's learning curves as a PNG at target; False when no run logged the metric."""
    import matplotlib.pyplot as plt

    fig = curve_figure(runs, group_by, metric)
    if fig is None:
        return False
    with atomic_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ the command
OWN_FILE = re.compile(r"^(report\.md|compare\.json|curve_.+\.png)$")


def check_out(out: Path) -> None:
    """`--out` may be new, empty or an earlier comparison: another command's report or results are never
    written over."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: not a directory")
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not OWN_FILE.match(n)]
    if not foreign and "report.md" in names and "compare.json" not in names:
        foreign = ["report.md"]  # `wmtp report` writes a report.md too
    if foreign:
        listed = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ConfigError(f"--out {out}: holds files that wmtp compare did not write ({listed}); give a new or empty "
                          "directory")


def run_compare(sources: list[str], *, group_by: list[str], metrics: list[str], baseline: str | None,
                out: Path | None, tracking_uri: str | None) -> tuple[dict, str]:
    if out is not None:
        check_out(out)
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
        if plots:
            report += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + f"\n\nLearning curves. {BAND}.\n"
        with atomic_file(out / "report.md") as tmp:
            tmp.write_text(report)
    return result, report
