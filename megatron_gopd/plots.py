"""Plots of training runs: curves vs step for one or more runs, and a lambda sweep.

    python -m megatron_gopd.plots --run OPD=runs/opd --run ExOPD=runs/exopd --out plots/

reads each run directory's ``metrics.jsonl`` (written by ``gopd-train``) and writes

* ``curves.png``: evaluation accuracy, reverse KL to the teacher and response length vs step, one
  line per run (the reverse KL is the evaluation set's where there is one, else the training
  batches');
* ``lambda_sweep.png`` when two or more runs differ in lambda (read from ``run_config.json``):
  the same three quantities at each run's last evaluation vs lambda.

Accuracy of benchmark evaluations with confidence intervals is ``megatron_gopd.evaluation.report``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_gopd.utils import GopdError, check_writable, cli_errors

__all__ = ["load_metrics", "plot_curves", "plot_lambda_sweep", "pyplot", "save_figure"]

PANELS = (
    ("accuracy", ("eval/accuracy",), "accuracy (eval prompts)"),
    (
        "reverse KL",
        ("eval/reverse_kl", "train/kl_teacher"),
        "reverse KL to the teacher (nats/token)",
    ),
    ("response length", ("eval/response_len", "rollout/response_len"), "response length (tokens)"),
)


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise GopdError(f"{run_dir} has no metrics.jsonl (not a gopd-train run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_lambda(run_dir: str | Path) -> float | None:
    """The run's lambda when it has a single one (``run_config.json``), else None."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    # "routing" since the trainer package; "gopd" in runs written before it
    lambdas = config.get("routing", config.get("gopd", {})).get("lambdas")
    if isinstance(lambdas, dict) and len(set(lambdas.values())) == 1:
        return float(next(iter(lambdas.values())))
    return None


def _series(
    metrics: list[dict], keys: tuple[str, ...]
) -> tuple[list[int], list[float], str | None]:
    for key in keys:
        pts = [(m["step"], m[key]) for m in metrics if key in m and math.isfinite(m[key])]
        if pts:
            return [p[0] for p in pts], [p[1] for p in pts], key
    return [], [], None


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise GopdError("plots need matplotlib: pip install 'megatron_gopd[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, out) -> Path:
    """Lay out ``fig``, write it to ``out`` (PNG, parents made), close it; returns the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(runs: dict[str, list[dict]], out: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for ax, (title, keys, ylabel) in zip(axes, PANELS, strict=True):
        used = set()
        for name, metrics in runs.items():
            xs, ys, key = _series(metrics, keys)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name)
                used.add(key)
        ax.set(
            title=title + (f" [{', '.join(sorted(used))}]" if used else " (no data)"),
            xlabel="step",
            ylabel=ylabel,
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, out)


def plot_lambda_sweep(points: dict[float, list[dict]], out: str | Path) -> Path:
    """Last evaluation of each run vs its lambda."""
    plt = pyplot()
    lams = sorted(points)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for ax, (title, keys, ylabel) in zip(axes, PANELS, strict=True):
        xs, ys = [], []
        for lam in lams:
            _, vals, _ = _series(points[lam], keys)
            if vals:
                xs.append(lam)
                ys.append(vals[-1])
        ax.plot(xs, ys, marker="o")
        ax.axvline(1.0, color="grey", ls=":", lw=1)  # lambda = 1: plain OPD
        ax.set(title=f"{title} at the end vs lambda", xlabel="lambda", ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    return save_figure(plt, fig, out)


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.plots", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="a gopd-train --save directory",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    a = p.parse_args(argv)
    check_writable(a.out, "--out", directory=True)
    runs: dict[str, list[dict]] = {}
    lambdas: dict[float, list[dict]] = {}
    for item in a.run:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        runs[name] = load_metrics(path)
        lam = run_lambda(path)
        if lam is not None:
            lambdas[lam] = runs[name]
    written = [plot_curves(runs, a.out / "curves.png")]
    if len(lambdas) >= 2:
        written.append(plot_lambda_sweep(lambdas, a.out / "lambda_sweep.png"))
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
