"""The demo's table and plot, from its ``results.json`` summary and the runs' metrics."""

from __future__ import annotations

from pathlib import Path

from megatron_gopd.plots import pyplot, save_figure

__all__ = ["by_lambda", "label", "plot", "table"]


def label(lam: float) -> str:
    if lam == 1.0:
        return "OPD"
    return "ExOPD" if lam > 1.0 else "interpolation"


def by_lambda(runs: list[dict]) -> dict[float, list[dict]]:
    """Runs grouped by lambda (ascending), each group in seed order."""
    out: dict[float, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["lam"], r["seed"])):
        out.setdefault(r["lam"], []).append(r)
    return out


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(summary: dict) -> str:
    b = summary["budget"]
    k = b["eval_samples"]
    lines = [
        f"| model | lambda | sampled accuracy (avg@{k}, T=1) | per seed | greedy accuracy | "
        "response tokens | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"student_base": "student base (the reference)", "teacher": "teacher"}
    for key, r in summary["baselines"].items():
        lines.append(
            f"| {names[key]} | - | {r['sampled']:.3f} ± {r['sampled_ci95']:.3f} | - | "
            f"{r['greedy']:.3f} ± {r['greedy_ci95']:.3f} | {r['response_len']:.2f} | - |"
        )
    for lam, rs in by_lambda(summary["runs"]).items():
        lines.append(
            f"| student after {label(lam)} | {lam:g} | {_spread([r['sampled'] for r in rs])} | "
            f"{', '.join(format(r['sampled'], '.3f') for r in rs)} | "
            f"{_spread([r['greedy'] for r in rs])} | "
            f"{sum(r['response_len'] for r in rs) / len(rs):.2f} | "
            f"{sum(r['s_per_step'] for r in rs) / len(rs):.2f} |"
        )
    n = summary["budget"]["seeds"]
    lines += [
        "",
        f"{b['eval_prompts']} held-out prompts. Student rows: mean over {n} training seed(s) "
        "[min, max], from the same base and teacher; base and teacher: ± the 95% interval of the "
        f"evaluation itself (over prompts). {b['steps']} G-OPD steps of "
        f"{b['rollout_batch_size']} prompts x {b['n_samples_per_prompt']} samples per run, "
        f"lr {b['lr']:g}.",
    ]
    return "\n".join(lines)


def plot(summary: dict, curves: dict, out: str | Path) -> Path:
    """One figure: final sampled and greedy accuracy vs lambda (seeds as points, the mean with
    its range, the teacher's and the base's lines), and the trainer's evaluation curves."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    groups = by_lambda(summary["runs"])
    lams = list(groups)
    colors = {lam: plt.cm.viridis(i / max(len(lams) - 1, 1)) for i, lam in enumerate(lams)}
    base, teacher = summary["baselines"]["student_base"], summary["baselines"]["teacher"]
    for ax, key, title in (
        (axes[0, 0], "sampled", f"sampled accuracy (avg@{summary['budget']['eval_samples']}, T=1)"),
        (axes[0, 1], "greedy", "greedy accuracy"),
    ):
        ax.axhline(teacher[key], color="tab:red", lw=1.5, label="teacher")
        ax.axhline(base[key], color="grey", ls="--", lw=1.5, label="student base")
        for lam, rs in groups.items():
            ys = [r[key] for r in rs]
            mean = sum(ys) / len(ys)
            ax.errorbar(
                [lam],
                [mean],
                yerr=[[mean - min(ys)], [max(ys) - mean]],
                fmt="o",
                color=colors[lam],
                ms=8,
                capsize=4,
            )
            ax.scatter([lam] * len(ys), ys, color="black", s=10, zorder=3)
        ax.axvline(1.0, color="grey", ls=":", lw=1)  # lambda = 1: OPD
        ax.set_xticks(lams)
        ax.set(title=title + " after training vs lambda", xlabel="lambda", ylabel="accuracy")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, key, title in (
        (axes[1, 0], "eval/accuracy", "sampled accuracy during training (trainer's evaluation)"),
        (axes[1, 1], "eval/reverse_kl", "reverse KL to the teacher (nats/token)"),
    ):
        seen = set()
        for run, metrics in curves.items():
            pts = [(m["step"], m[key]) for m in metrics if key in m]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs,
                ys,
                color=colors[run.lam],
                lw=1.2,
                alpha=0.8,
                label=None if run.lam in seen else f"lambda {run.lam:g} ({label(run.lam)})",
            )
            seen.add(run.lam)
        if key == "eval/accuracy":  # (the baselines on the final evaluation's prompts)
            ax.axhline(teacher["sampled"], color="tab:red", lw=1, label="teacher")
            ax.axhline(base["sampled"], color="grey", ls="--", lw=1, label="student base")
        ax.set(title=title, xlabel="step")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, out)
