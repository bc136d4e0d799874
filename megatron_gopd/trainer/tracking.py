"""Observability: per-phase timers, metric reduction across micro-batches and ranks, and sinks
(console, ``metrics.jsonl``, TensorBoard, Weights & Biases).

Metrics from the loss arrive as ``name -> tensor([weighted_sum, weight])`` per micro-batch;
:func:`sum_reports` sums them over micro-batches and data-parallel ranks, and the loss module's
``finalize_report`` divides once, so a token-weighted mean stays token-weighted however the batch
was split. Only global rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from megatron_gopd import parallel
from megatron_gopd.flags import flag
from megatron_gopd.utils import get_logger

__all__ = ["LogConfig", "MetricsLogger", "PhaseTimer", "format_step_line", "sum_reports"]

log = get_logger(__name__)


@dataclass(frozen=True)
class LogConfig:
    FLAG_GROUP = "checkpointing, evaluation, logging (Megatron-LM names)"

    log_interval: int = flag(1, help="steps between console lines (every step is in the logs)")
    tensorboard_dir: str | None = flag(
        None, help="TensorBoard event directory", default_help="SAVE/tensorboard"
    )
    wandb_project: str | None = flag(None, help="Weights & Biases project (off when unset)")
    wandb_exp_name: str | None = flag(None, help="Weights & Biases run name")
    wandb_save_dir: str | None = flag(
        None, help="Weights & Biases local directory", default_help="SAVE"
    )
    wandb_mode: Literal["online", "offline", "disabled"] = flag(
        "online", help="Weights & Biases mode (offline: no network, sync later)"
    )
    progress: bool = flag(
        True, name="--no-progress", invert=True, help="no progress bars (log lines only)"
    )


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (rollout, teacher, reference, update, sync...)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        from megatron_gopd import platform

        if platform.cuda_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if platform.cuda_available():
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = defaultdict(float)
        return out


def sum_reports(reports: Iterable[dict[str, torch.Tensor]], group=None) -> dict[str, torch.Tensor]:
    """Sum ``[weighted_sum, weight]`` pairs over micro-batches, then over the ranks of ``group``.

    The loss puts the same metric names in every report (absent domains with weight 0), but a rank
    with no micro-batch at all has none: names are agreed on first, missing ones count as zeros.
    """
    acc: dict[str, torch.Tensor] = {}
    for rep in reports:
        for k, v in rep.items():
            v = v.detach().double().reshape(-1)[:2].cpu()
            acc[k] = acc[k] + v if k in acc else v.clone()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        names = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, sorted(acc), group=group)
        all_names = sorted(set().union(*names))
        from megatron_gopd import platform

        dev = platform.device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
        stacked = torch.stack(
            [acc.get(k, torch.zeros(2, dtype=torch.float64)) for k in all_names]
        ).to(dev)
        dist.all_reduce(stacked, group=group)
        acc = dict(zip(all_names, stacked.cpu(), strict=True))
    return acc


class MetricsLogger:
    """Rank-0 sink for per-step metrics. ``metrics.jsonl`` is always written when a run directory
    exists (the plot script reads it); TensorBoard and W&B when configured."""

    def __init__(
        self,
        run_dir: Path | None,
        cfg,
        *,
        run_config: dict[str, Any] | None = None,
        resume_step: int = 0,
    ):
        self.enabled = parallel.is_rank0()
        self.cfg = cfg
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            if run_config is not None:  # what the run was asked to do (plots read lambda here)
                (run_dir / "run_config.json").write_text(
                    json.dumps(run_config, indent=2, sort_keys=True, default=str)
                )
            path = run_dir / "metrics.jsonl"
            if resume_step and path.exists():
                _truncate_after(path, resume_step)
            self._jsonl = path.open("a")
        tb_dir = cfg.tensorboard_dir or (str(run_dir / "tensorboard") if run_dir else None)
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    tb_dir, purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs")
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb-project needs `pip install wandb`") from None
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_exp_name,
                mode=cfg.wandb_mode,
                dir=cfg.wandb_save_dir or (str(run_dir) if run_dir else None),
                config=run_config or {},
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines of steps after the checkpoint (they will be recomputed)."""
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def format_step_line(step: int, total: int, m: dict[str, float]) -> str:
    """One console line with what users watch first."""
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (
        ("train/kl_teacher", "rKL", "{:.4f}"),
        ("train/advantage", "adv", "{:+.4f}"),
        ("train/entropy", "ent", "{:.3f}"),
        ("rollout/response_len", "len", "{:.1f}"),
        ("eval/accuracy", "acc", "{:.3f}"),
        ("eval/reverse_kl", "eval rKL", "{:.4f}"),
        ("optim/grad_norm", "gnorm", "{:.3f}"),
        ("perf/tokens_per_s", "tok/s", "{:.0f}"),
        ("time/step", "s/step", "{:.2f}"),
    ):
        if key in m and m[key] is not None and math.isfinite(m[key]):
            parts.append(f"{label} {fmt.format(m[key])}")
    return " | ".join(parts)
