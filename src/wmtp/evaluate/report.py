"""Reports: results.json (machine-readable), report.md (human-readable) and plots, for one evaluation or side by
side for several (`wmtp report RUN...`). A metric that was not computed is shown as "—", never as a number.
With several runs, each later one is compared with the first on the problems both scored: the paired
difference of pass@k with a paired bootstrap interval, and McNemar's exact test for greedy (0/1) scores.

An evaluation directory holds results.json (written by `wmtp eval` / `wmtp execute`). A training run directory
is accepted too: its latest `eval-*` evaluation is used, and its weight histograms (`*_weight_histogram.json`)
are plotted.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime.atomic import atomic_file
from .passk import paired_difference

MISSING = "—"


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _fmt(value, spec: str = ".4f") -> str:
    return MISSING if value is None else format(value, spec)


def pass_cell(entry: dict | None) -> str:
    """A pass@k value in percent with its bootstrap interval and, where the summary has it, its Wilson interval
    (which does not collapse to a point at 0/n or n/n): `3.2 [1.8, 4.8] W[2.0, 5.1]`."""
    if entry is None:
        return MISSING
    low, high = entry["ci95"]
    cell = f"{100 * entry['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    if entry.get("wilson95") is not None:
        low, high = entry["wilson95"]
        cell += f" W[{100 * low:.1f}, {100 * high:.1f}]"
    return cell


def find_results(run: Path) -> tuple[Path, dict]:
    """The evaluation directory for `run` (itself, or a training run's latest eval-*) and its results."""
    if (run / "results.json").is_file():
        return run, json.loads((run / "results.json").read_text())
    evals = sorted(p for p in run.glob("eval-*") if (p / "results.json").is_file())
    if not evals:
        raise FileNotFoundError(f"{run}: no results.json here and no eval-*/results.json below")
    return evals[-1], json.loads((evals[-1] / "results.json").read_text())


def _histograms(run: Path) -> dict[str, dict]:
    found = {}
    for directory in (run, run.parent):
        for path in sorted(directory.glob("*_weight_histogram.json")):
            found.setdefault(path.name.removesuffix("_weight_histogram.json"), json.loads(path.read_text()))
    return found


def markdown(names: list[str], results: list[dict]) -> str:
    """A side-by-side report: pass@k (with 95% CIs and sampling settings), head quality and teacher-forced
    acceptance."""
    lines = ["# wmtp evaluation report", ""]
    for name, res in zip(names, results, strict=True):
        src = res.get("checkpoint", "generations file")
        gen = res.get("passk", {}).get("generation", {})
        settings = ", ".join(f"{k} {gen[k]}" for k in ("n", "temperature", "top_p", "max_new_tokens") if k in gen)
        lines.append(f"- **{name}**: {src}" + (f" ({settings})" if settings else ""))
    lines.append("")
    benchmarks = sorted({b for r in results for b in r.get("passk", {}).get("benchmarks", {})})
    ks = sorted({k for r in results for k in r.get("passk", {}).get("ks", [])})
    if benchmarks:
        lines += ["## pass@k (%) with 95% bootstrap CI over problems and W[95% Wilson score interval]", "",
                  "| run | benchmark | problems | n | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|---|---|---|" + "---|" * len(ks)]
        for name, res in zip(names, results, strict=True):
            for b in benchmarks:
                entry = res.get("passk", {}).get("benchmarks", {}).get(b)
                if entry is None:
                    lines.append(f"| {name} | {b} | {MISSING} | {MISSING} | " + " | ".join([MISSING] * len(ks)) + " |")
                    continue
                cells = [pass_cell(entry["pass@k"].get(f"pass@{k}")) for k in ks]
                lines.append(f"| {name} | {b} | {entry['problems']} | {entry['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _paired_lines(names, results, ks)
    n_heads = max((len(r["heads"]["heads"]) for r in results if r.get("heads")), default=0)
    if n_heads:
        lines += ["## Head quality on held-out text (CE / perplexity / top-1 accuracy)", "",
                  "| run | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |", "|---|" + "---|" * n_heads]
        for name, res in zip(names, results, strict=True):
            heads = (res.get("heads") or {}).get("heads", [])
            cells = []
            for h in range(n_heads):
                s = heads[h] if h < len(heads) else {"ce": None, "ppl": None, "acc": None}
                cells.append(MISSING if s["ce"] is None else
                             f"{s['ce']:.3f} / {s['ppl']:.1f} / {100 * s['acc']:.1f}%")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _acceptance_lines(names, results)
    skipped = [(name, res["heads_skipped"]) for name, res in zip(names, results, strict=True)
               if res.get("heads_skipped")]
    if skipped:
        lines += [f"Head quality of **{name}**: not measured ({reason})." for name, reason in skipped] + [""]
    for name, res in zip(names, results, strict=True):
        spec = res.get("speculative")
        if spec:
            lines += [f"## Self-speculative decoding: {name}", "",
                      f"mean accepted length {_fmt(spec.get('mean_accepted_length'), '.3f')}, acceptance per head "
                      + ", ".join(_fmt(a, ".3f") for a in spec.get("acceptance_per_head", [])), ""]
    return "\n".join(lines)


def _acceptance_lines(names: list[str], results: list[dict]) -> list[str]:
    """Teacher-forced acceptance per depth on the held-out text (docs/method.md §6), one row per evaluation that
    measured it; a depth without an eligible position is "—"."""
    measured = [(name, res["heads"]["acceptance"]) for name, res in zip(names, results, strict=True)
                if (res.get("heads") or {}).get("acceptance", {}).get("depths")]
    if not measured:
        return []
    depths = max(len(a["depths"]) for _, a in measured)
    lines = ["## Teacher-forced acceptance against head 0 on held-out text", "",
             "Depth k at t is accepted when head k's argmax equals head 0's argmax at t+k (both teacher-forced), given "
             "depths 1…k-1 were; accepted / eligible positions.", "",
             "| run | " + " | ".join(f"depth {k}" for k in range(1, depths + 1)) + " | expected tokens per forward |",
             "|---|" + "---|" * (depths + 1)]
    for name, acceptance in measured:
        cells = [MISSING if d["rate"] is None else f"{d['rate']:.3f} ({d['accepted']}/{d['eligible']})"
                 for d in acceptance["depths"]] + [MISSING] * (depths - len(acceptance["depths"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(acceptance['tokens_per_forward'], '.3f')} |")
    return [*lines, ""]


def paired_differences(names: list[str], results: list[dict], ks: list[int]) -> list[dict]:
    """Each later run against the first on the problems both scored, per benchmark and k (`paired_difference`)."""
    rows = []
    base = results[0].get("passk", {}).get("benchmarks", {})
    for name, res in zip(names[1:], results[1:], strict=True):
        for benchmark, entry in sorted(res.get("passk", {}).get("benchmarks", {}).items()):
            if benchmark not in base:
                continue
            for k in ks:
                key = f"pass@{k}"
                ours = {t: p[key] for t, p in entry["per_problem"].items() if key in p}
                theirs = {t: p[key] for t, p in base[benchmark]["per_problem"].items() if key in p}
                if set(ours) & set(theirs):
                    rows.append({"run": name, "benchmark": benchmark, "k": k,
                                 **paired_difference(theirs, ours)})
    return rows


def _paired_lines(names: list[str], results: list[dict], ks: list[int]) -> list[str]:
    rows = paired_differences(names, results, ks) if len(results) > 1 else []
    if not rows:
        return []
    lines = [f"## Paired differences against {names[0]} (percentage points)", "",
             "Same problems, resampled together (2,000 paired bootstrap resamples); better / worse: problems where "
             "the run scores higher / lower; McNemar: exact two-sided test (0/1 scores only).", "",
             "| run | benchmark | k | problems | Δ pass@k [95% CI] | better | worse | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95"]
        p = MISSING if r["mcnemar_p"] is None else f"{r['mcnemar_p']:.3g}"
        lines.append(f"| {r['run']} | {r['benchmark']} | {r['k']} | {r['problems']} | {100 * r['delta']:+.1f} "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}] | {r['better']} | {r['worse']} | {p} |")
    return [*lines, ""]


def head_accuracy_figure(names: list[str], heads: list[dict]):
    """Per-head top-1 accuracy as grouped bars (one group per head, one bar per evaluation; a head not measured
    has no bar) and accuracy by position bucket; `heads` are the evaluations' `results["heads"]`. The legends
    sit below the axes, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(names)
    n_heads = max(len(h["heads"]) for h in heads)
    for i, (name, report) in enumerate(zip(names, heads, strict=True)):
        offset = (i - (len(names) - 1) / 2) * width  # the group is centred on its head's tick
        measured = [(h, a["acc"]) for h, a in enumerate(report["heads"]) if a["acc"] is not None]
        ax.bar([h + offset for h, _ in measured], [acc for _, acc in measured], width=width, label=name)
        for h in range(len(report["heads"])):
            pts = [(b["positions"][0], b["heads"][h]["acc"]) for b in report["buckets"]
                   if b["heads"][h]["acc"] is not None]
            if pts:
                bx.plot(*zip(*pts, strict=True), marker="o", label=f"{name} head {h}")
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
    ax.set(xlabel="head (predicts token t+1+h)", ylabel="top-1 accuracy", title="Per-head accuracy")
    bx.set(xlabel="position bucket start", ylabel="top-1 accuracy", title="Accuracy by position")
    for axes, size in ((ax, 8), (bx, 7)):
        entries = len(axes.get_legend_handles_labels()[1])
        axes.legend(fontsize=size, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, entries) or 1)
    return fig


def plots(out: Path, names: list[str], results: list[dict], runs: list[Path]) -> list[Path]:
    """Per-head accuracy (grouped bars), accuracy by position bucket, and Rho-1/critic weight distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with_heads = [(n, r["heads"]) for n, r in zip(names, results, strict=True) if r.get("heads")]
    if with_heads:
        fig = head_accuracy_figure([n for n, _ in with_heads], [h for _, h in with_heads])
        written.append(_save(fig, out / "head_accuracy.png"))
        plt.close(fig)
    histograms = [(n, h) for n, run in zip(names, runs, strict=True) for h in _histograms(run).items()]
    if histograms:
        fig, axes = plt.subplots(1, len(histograms), figsize=(5 * len(histograms), 3.5), squeeze=False)
        for ax, (name, (scheme, table)) in zip(axes[0], histograms, strict=True):
            edges = table["bin_edges"]
            for h, counts in enumerate(table["counts_per_head"]):
                total = sum(counts) or 1
                ax.step(edges[:-1], [c / total for c in counts], where="post", label=f"head {h}")
            ax.set(xlabel="weight", ylabel="fraction of pairs", title=f"{name}: {scheme} weights")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "weight_distributions.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    """Atomically, with the legends below the axes inside the picture."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    return path


def write_reports(out: Path, names: list[str], results: list[dict], runs: list[Path]) -> list[Path]:
    """report.md and plots in `out` (created); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = plots(out, names, results, runs)
    text = markdown(names, results)
    if files:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in files) + "\n"
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(text)
    return [out / "report.md", *files]
