"""``gopd-train``: Generalized On-Policy Distillation of a student from its teacher(s).

    gopd-train --student-load ... (one process)
    torchrun --nproc-per-node 8 -m megatron_gopd.train \\
        --student-load ckpt/qwen3-4b --teacher-load ckpt/qwen3-4b-teacher \\
        --gopd-lambda 1.25 --prompt-data prompts.jsonl --save runs/exopd ...

Per response token t of a student sample, the advantage is

    A_t = (log pi_theta(y_t) - log pi*(y_t)) + (lambda - 1) (log pi_ref(y_t) - log pi*(y_t))

(detached) and the student minimises the token-mean of A_t log pi_theta(y_t). lambda = 1 is OPD;
lambda > 1 is ExOPD (reward extrapolation). See README.md for every flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from megatron_gopd import parallel
from megatron_gopd.trainer.config import TrainConfig, build_config, parse_args
from megatron_gopd.utils import cli_errors, get_logger, quiet_expected_warnings

__all__ = ["main", "train"]

log = get_logger(__name__)


def train(cfg: TrainConfig, rollout_factory=None) -> dict[str, float]:
    """Run the training loop; returns the last step's metrics (on global rank 0)."""
    from megatron_gopd.trainer.rollout_side import make_rollout
    from megatron_gopd.trainer.stages import GOPDTrainer

    trainer = GOPDTrainer(cfg, rollout_factory or make_rollout)
    metrics: dict[str, float] = {}
    try:
        every = cfg.eval.interval
        if trainer.start_step == 0 and every:
            trainer.logger.log(0, trainer.evaluate(0))
        for step in range(trainer.start_step + 1, cfg.train_iters + 1):
            t0 = time.perf_counter()
            with trainer.timer("rollout"):
                samples = trainer.rollout_step(step)
            with trainer.timer("teacher"):
                trainer.score_teachers(samples)
            with trainer.timer("reference"):
                trainer.score_reference(samples)
            with trainer.timer("update"):
                metrics = trainer.update(samples)
            with trainer.timer("sync"):
                trainer.sync_weights()
            if every and (step % every == 0 or step == cfg.train_iters):
                metrics.update(trainer.evaluate(step))
            stop = trainer.stop_requested()  # SIGTERM with --exit-signal-handler
            save_every = cfg.checkpoint.save_interval
            if (save_every and step % save_every == 0) or step == cfg.train_iters or stop:
                trainer.save(step)
            metrics = trainer.log_step(
                step, metrics, time.perf_counter() - t0, trainer.rollout_metrics(samples)
            )
            if stop:
                log.info("stopped after step %d on SIGTERM; the checkpoint resumes it", step)
                break
    finally:
        trainer.close()
    return metrics


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    quiet_expected_warnings()
    cfg = build_config(parse_args(argv))
    try:
        train(cfg)
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
