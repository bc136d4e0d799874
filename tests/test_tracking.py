"""Metric sinks and reduction: metrics.jsonl, TensorBoard, W&B offline, resume truncation."""

import json
import os

import torch

from megatron_gopd.gopd import finalize_report
from megatron_gopd.trainer.tracking import LogConfig, MetricsLogger, format_step_line, sum_reports


def test_sum_then_finalize_is_the_token_weighted_mean():
    # two micro-batches: 3 tokens with mean 1.0 and 1 token of 5.0 -> (3 + 5) / 4 = 2.0, not 3.0
    reports = [{"kl_teacher": torch.tensor([3.0, 3.0])}, {"kl_teacher": torch.tensor([5.0, 1.0])}]
    assert finalize_report(sum_reports(reports))["kl_teacher"] == 2.0


def test_all_sinks_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LogConfig(wandb_project="gopd-test", wandb_mode="offline", wandb_save_dir=str(tmp_path))
    run_config = {"gopd": {"lambdas": {"default": 1.25}}}
    logger = MetricsLogger(tmp_path, cfg, run_config=run_config)
    for step in (1, 2, 3):
        logger.log(step, {"train/kl_teacher": 1.0 / step, "time/step": 0.5})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[2]["train/kl_teacher"] == 1 / 3
    assert json.loads((tmp_path / "run_config.json").read_text()) == run_config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/kl_teacher")] == [1, 2, 3]
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    # an offline run keeps its history in the binary log, as protobuf records whose keys are
    # strings and values JSON text: every logged value of the metric is there
    log = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"train/kl_teacher" in log
    assert all(json.dumps(1.0 / s).encode() in log for s in (1, 2, 3))
    # resuming from step 2: step 3 will be recomputed, so its line is dropped
    logger = MetricsLogger(tmp_path, LogConfig(), resume_step=2)
    logger.log(3, {"train/kl_teacher": 0.25})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["train/kl_teacher"]) for x in lines] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert not os.environ.get("WANDB_MODE")  # nothing leaked into the environment


def test_console_line_shows_what_users_watch():
    line = format_step_line(
        7,
        10,
        {
            "train/kl_teacher": 0.1234,
            "eval/accuracy": 0.5,
            "time/step": 1.5,
            "optim/grad_norm": float("nan"),
        },
    )
    assert line == "step 7/10 | rKL 0.1234 | acc 0.500 | s/step 1.50"
