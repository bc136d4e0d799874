"""A stand-in for the trainer in the launcher's Slurm tests (run by torchrun on every node).

It joins the gloo group, checks that every rollout URL it was given answers, records what it saw
in ``OUT/rank<r>-restart<k>.json``, and then, by ``--mode``:

- ``fail``: the rank on node ``--fail-node`` exits with status 3; the others hang (as a rank
  blocked in a collective would), so only the launcher can end them;
- ``train``: counts ``--steps`` steps of ``--step-seconds``, checkpointing the step count in
  ``OUT/ckpt.json`` after each and resuming from it; on SIGTERM it finishes the current step,
  saves and exits 0 (what Megatron's ``--exit-signal-handler`` does). Events go to
  ``OUT/events.log``.
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["fail", "train"], required=True)
    p.add_argument("--fail-node", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-seconds", type=float, default=0.5)
    p.add_argument("--rollout-urls", nargs="*", default=[])
    args = p.parse_args()

    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    rank, node = int(os.environ["RANK"]), int(os.environ["GROUP_RANK"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    dist.init_process_group("gloo")
    reached = {
        url: urllib.request.urlopen(url + "/health_generate", timeout=10).status
        for url in args.rollout_urls
    }
    record = {
        "rank": rank,
        "node_rank": node,
        "world_size": dist.get_world_size(),
        "host": os.environ.get("SLURMD_NODENAME"),
        "restart": restart,
        "rollout_urls": reached,
        "env": {k: os.environ.get(k) for k in ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_CUMEM_ENABLE")},
    }
    (args.out / f"rank{rank}-restart{restart}.json").write_text(json.dumps(record))
    dist.barrier()

    if args.mode == "fail":
        if node == args.fail_node:
            print(f"rank {rank} on node {node}: failing on purpose", flush=True)
            return 3
        time.sleep(600)
        return 0

    ckpt = args.out / "ckpt.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    events = args.out / "events.log"

    def event(text: str) -> None:
        if rank == 0:
            with events.open("a") as f:
                f.write(f"restart {restart}: {text}\n")

    event(f"start at step {step}")
    while step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.replace(ckpt)
        # every rank stops at the same step, as Megatron's distributed signal handler does
        flag = torch.tensor([1 if stop["requested"] else 0])
        dist.all_reduce(flag)
        if flag.item():
            event(f"stopped by SIGTERM at step {step}")
            break
    else:
        event(f"finished at step {step}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
