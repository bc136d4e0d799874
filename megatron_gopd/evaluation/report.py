"""Compare evaluation runs: tables with confidence intervals, and plots vs lambda or step.

    python -m megatron_gopd.evaluation.report --run base=out/base --run OPD=out/opd \\
        --run ExOPD=out/exopd --baseline base --x lambda --out out/report

Each run is an ``evaluate()`` output dir (``summary.json`` + ``records/*.jsonl``). Intervals are
recomputed here from the per-sample records (bootstrap over problems, see ``metrics.py``), so runs
made at different times are compared the same way; the "Avg" column bootstraps each benchmark's
problems independently and averages the benchmark means, as the paper's averages do. With a
baseline, a third table gives each run's difference to it on the same problems (paired bootstrap),
marked ``*`` when its interval excludes 0 and the benchmark has at least ``MIN_PROBLEMS_FOR_STAR``
problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_gopd.evaluation.metrics import bootstrap_ci
from megatron_gopd.utils import GopdError, check_writable, cli_errors

__all__ = ["Run", "comparison", "comparison_markdown", "load_run", "plot_vs"]

# A percentile bootstrap over fewer problems than this is too coarse to call a difference
# significant (2 problems give at most 3 distinct resampled means).
MIN_PROBLEMS_FOR_STAR = 10


@dataclass
class Run:
    """One evaluation run: its name, tags, and per benchmark the per-problem sample scores."""

    name: str
    tags: dict[str, Any]
    correct: dict[str, dict[str, list[bool]]]  # benchmark -> problem id -> correctness per sample
    lengths: dict[str, list[int]]  # benchmark -> response tokens per sample


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    d = Path(path)
    summary_path = d / "summary.json"
    if not summary_path.is_file():
        raise GopdError(f"{d} is not an evaluation output dir (no summary.json)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    correct: dict[str, dict[str, list[bool]]] = {}
    lengths: dict[str, list[int]] = {}
    for bench in summary["benchmarks"]:
        rec = d / "records" / f"{bench}.jsonl"
        if not rec.is_file():
            raise GopdError(f"{d}: missing records/{bench}.jsonl")
        by_problem: dict[str, list[bool]] = {}
        lens = []
        for line in rec.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            by_problem.setdefault(str(r["problem_id"]), []).append(bool(r["correct"]))
            lens.append(int(r["response_tokens"]))
        correct[bench], lengths[bench] = by_problem, lens
    tags = summary.get("tags", {})
    return Run(name or str(tags.get("run") or d.name), tags, correct, lengths)


def _means(run: Run, bench: str) -> dict[str, float]:
    return {pid: float(np.mean(c)) for pid, c in run.correct[bench].items()}


def _avg_ci(
    groups: list[np.ndarray], level: float, seed: int, n_boot: int = 10_000
) -> tuple[float, float]:
    """Interval of the mean of group means, resampling within each group (stratified)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for g in groups:
        draws += g[rng.integers(0, len(g), size=(n_boot, len(g)))].mean(axis=1)
    draws /= len(groups)
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a])
    return float(lo), float(hi)


def comparison(
    runs: list[Run], *, baseline: str | None = None, level: float = 0.95, seed: int = 0
) -> dict:
    """Per run and benchmark: accuracy, interval, mean length, and the paired difference to the
    baseline run. Benchmarks are those every run has; a difference needs the same problem ids."""
    if not runs:
        raise GopdError("no run to compare")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise GopdError(f"run names must be unique, got {names}")
    benches = [b for b in runs[0].correct if all(b in r.correct for r in runs)]
    if not benches:
        raise GopdError("the runs have no benchmark in common")
    base = None
    if baseline is not None:
        base = next((r for r in runs if r.name == baseline), None)
        if base is None:
            raise GopdError(f"baseline {baseline!r} is not one of the runs {names}")
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        row: dict[str, dict] = {}
        for b in benches:
            m = _means(run, b)
            lo, hi = bootstrap_ci(list(m.values()), level=level, seed=seed)
            cell = {
                "accuracy": float(np.mean(list(m.values()))),
                "ci": [lo, hi],
                "mean_response_tokens": float(np.mean(run.lengths[b])),
                "n_problems": len(m),
            }
            if base is not None and run is not base:
                mb = _means(base, b)
                if set(mb) != set(m):
                    raise GopdError(f"{run.name} and {base.name} differ in the problems of {b}")
                d = np.array([m[p] - mb[p] for p in sorted(m)])
                dlo, dhi = bootstrap_ci(d, level=level, seed=seed)
                cell["delta"] = {"mean": float(d.mean()), "ci": [dlo, dhi]}
            row[b] = cell
        groups = [np.array(list(_means(run, b).values())) for b in benches]
        row["Avg"] = {
            "accuracy": float(np.mean([g.mean() for g in groups])),
            "ci": list(_avg_ci(groups, level, seed)),
            "mean_response_tokens": float(np.mean([np.mean(run.lengths[b]) for b in benches])),
        }
        table[run.name] = row
    return {"benchmarks": benches, "level": level, "baseline": baseline, "runs": table,
            "tags": {r.name: r.tags for r in runs}}  # fmt: skip


def comparison_markdown(cmp: dict) -> str:
    benches = [*cmp["benchmarks"], "Avg"]
    pct = round(100 * cmp["level"])
    head = "| run | " + " | ".join(benches) + " |\n|---|" + "---:|" * len(benches)

    def rows(cell_fmt) -> list[str]:
        return [f"| {name} | " + " | ".join(cell_fmt(row.get(b)) for b in benches) + " |"
                for name, row in cmp["runs"].items()]  # fmt: skip

    def acc(c):
        return f"{100 * c['accuracy']:.1f} [{100 * c['ci'][0]:.1f}, {100 * c['ci'][1]:.1f}]"

    out = [
        f"### Accuracy (avg@k, %) with {pct}% bootstrap CI over problems",
        "",
        head,
        *rows(acc),
        "",
    ]
    out += [
        "### Mean response length (tokens)",
        "",
        head,
        *rows(lambda c: f"{c['mean_response_tokens']:.0f}"),
        "",
    ]
    if cmp["baseline"]:

        def delta(c):
            if c is None or "delta" not in c:
                return "-"
            d = c["delta"]
            excludes_zero = d["ci"][0] > 0 or d["ci"][1] < 0
            sig = "*" if excludes_zero and c["n_problems"] >= MIN_PROBLEMS_FOR_STAR else ""
            return f"{100 * d['mean']:+.1f}{sig} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"

        benches = cmp["benchmarks"]  # no average of differences: one row per benchmark
        head = "| run | " + " | ".join(benches) + " |\n|---|" + "---:|" * len(benches)
        out += [f"### Difference to {cmp['baseline']} (points, paired bootstrap CI; * = CI excludes 0, "
                f"shown from {MIN_PROBLEMS_FOR_STAR} problems on)", "", head, *rows(delta), ""]  # fmt: skip
    return "\n".join(out)


def plot_vs(cmp: dict, x: str, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Accuracy (with CI bars) and mean response length vs the tag ``x`` (lambda, step), one line
    per benchmark plus the average; runs without the tag are left out. Saved as PNG (Agg)."""
    from megatron_gopd.plots import pyplot, save_figure

    plt = pyplot()
    pts = [(cmp["tags"][n][x], n) for n in cmp["runs"] if x in cmp["tags"][n]]
    if len(pts) < 2:
        raise GopdError(f"fewer than two runs have a {x!r} tag (--tag {x}=VALUE when evaluating)")
    try:
        pts.sort(key=lambda p: float(p[0]))
    except (TypeError, ValueError):
        raise GopdError(f"the {x!r} tags are not all numbers: {[p[0] for p in pts]}") from None
    xs = [float(p[0]) for p in pts]
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(11, 4.2))
    span = (max(xs) - min(xs)) or 1.0
    names = [*cmp["benchmarks"], "Avg"]
    for i, b in enumerate(names):
        cells = [cmp["runs"][n][b] for _, n in pts]
        dodge = (i - (len(names) - 1) / 2) * 0.008 * span  # keep the error bars apart
        acc = np.array([100 * c["accuracy"] for c in cells])
        err = np.array(
            [[acc[i] - 100 * c["ci"][0], 100 * c["ci"][1] - acc[i]] for i, c in enumerate(cells)]
        ).T
        style = dict(lw=2.5, color="black") if b == "Avg" else dict(lw=1.2, alpha=0.85)
        ax_acc.errorbar(
            [x_ + dodge for x_ in xs], acc, yerr=err, marker="o", capsize=3, label=b, **style
        )
        ax_len.plot(xs, [c["mean_response_tokens"] for c in cells], marker="o", label=b, **style)
    ax_acc.set(
        xlabel=x,
        ylabel="accuracy (avg@k, %)",
        title=f"accuracy vs {x} ({int(100 * cmp['level'])}% CI)",
    )
    ax_len.set(xlabel=x, ylabel="mean response tokens", title=f"response length vs {x}")
    for ax in (ax_acc, ax_len):
        ax.grid(alpha=0.3)
        if x.lower() in ("lambda", "lam", "λ"):
            ax.axvline(1.0, color="grey", ls=":", lw=1)  # lambda = 1: standard OPD
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(plt, fig, path)


def _parse_run(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep and not os.path.exists(text) else (None, text)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.evaluation.report", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="repeatable, in table order",
    )
    p.add_argument("--baseline", default=None, help="run name to difference against")
    p.add_argument("--x", default=None, help="tag to plot against (lambda, step)")
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--out", required=True, help="dir for comparison.md/.json and the plot")
    args = p.parse_args(argv)
    check_writable(args.out, "--out", directory=True)
    if not args.run:
        raise GopdError("no run given: pass --run NAME=DIR (an evaluate() output dir)")
    if not 0 < args.level < 1:
        raise GopdError("--level must be in (0, 1)")
    runs = [load_run(path, name) for name, path in map(_parse_run, args.run)]
    cmp = comparison(runs, baseline=args.baseline, level=args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = comparison_markdown(cmp)
    (out / "comparison.md").write_text(md, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(cmp, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(md)
    if args.x:
        png = plot_vs(cmp, args.x, out / f"accuracy_length_vs_{args.x}.png")
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
