"""Resumable training checkpoints, written atomically.

Layout of a save directory::

    SAVE/
      latest                    "iter_0000040": the newest complete iteration
      iter_0000040/
        gopd_model.json         architecture + HF config (a model checkpoint like a converted one)
        tokenizer/
        model/                  dist checkpoint of the student (loads at any TP/PP)
        optim/                  dist checkpoint of the optimizer state (incl. fp32 main params)
        rng/rank_XXXXX.pt       per-rank RNG states (python, numpy, torch, CUDA, TP tracker)
        trainer_state.json      step, LR scheduler, data-iterator position, run metadata

Atomicity: everything is written into ``SAVE/.iter_0000040.tmp`` first; only when all ranks have
finished does rank 0 rename it into place and then replace ``latest`` (write + ``os.replace``).
A crash mid-save leaves at most a ``.tmp`` directory (cleaned up by the next save) and ``latest``
still names the previous complete iteration.

Each iteration directory is itself a model checkpoint: ``--student-load``, ``gopd-score --load``
and ``tools/convert_megatron_to_hf.py --load`` accept it (or the save directory: its latest).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import CheckpointException

from megatron_gopd import parallel
from megatron_gopd.flags import flag
from megatron_gopd.models.checkpoint import (
    LATEST_FILE,
    META_FILE,
    MODEL_SUBDIR,
    TOKENIZER_SUBDIR,
    CheckpointMeta,
    describe_checkpoint_error,
    load_model_weights,
    resolve_checkpoint,
)
from megatron_gopd.models.checksums import verify_checksums, write_checksums
from megatron_gopd.utils import GopdError, get_logger

__all__ = [
    "CheckpointConfig",
    "has_checkpoint",
    "iteration_dir",
    "load_training_checkpoint",
    "save_training_checkpoint",
]

log = get_logger(__name__)

GROUP = "checkpointing, evaluation, logging (Megatron-LM names)"


@dataclass(frozen=True)
class CheckpointConfig:
    FLAG_GROUP = GROUP

    save: str | None = flag(
        None, help="directory for checkpoints and run outputs (metrics, logs, plots)"
    )
    load: str | None = flag(
        None,
        help="resume from this save directory (its latest iteration); a directory without "
        "checkpoints starts a new run from --student-load, so a requeued job can pass --load "
        "and --save the same directory",
    )
    save_interval: int = flag(0, help="steps between checkpoints (0: at the end only)")
    exit_signal_handler: bool = flag(
        False,
        help="on SIGTERM, finish the current step, save a checkpoint and exit 0 (time limits, "
        "preemption; the Slurm launcher sends it)",
    )


OPTIM_SUBDIR = "optim"
# How the distributed optimizer's state is sharded in the checkpoint: Megatron-LM's default, fast to
# write (each data-parallel rank writes its own buffers) and resumable at the same TP/PP layout.
# megatron-core 0.16 has no usable default (its "fully_sharded_model_space" needs flattened ranges,
# which its dist_checkpointing refuses). Ignored by the non-distributed optimizer.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
RNG_SUBDIR = "rng"
STATE_FILE = "trainer_state.json"


def has_checkpoint(load: str | Path) -> bool:
    """Does ``load`` hold a training checkpoint to resume from (a ``latest`` file)?"""
    return (Path(load) / LATEST_FILE).is_file()


def iteration_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"iter_{step:07d}"


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    from megatron_gopd import platform

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if platform.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _non_finite_weight(model) -> str | None:
    """The name of the first parameter holding NaN or inf on this rank, or None."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


def _latest_of(save: Path) -> str:
    latest = save / LATEST_FILE
    try:
        return f"{LATEST_FILE} still names {latest.read_text().strip()}"
    except (OSError, UnicodeDecodeError):
        return "no earlier checkpoint exists"


def _save_failure(e: BaseException, where: Path) -> str:
    """What went wrong in a save, in one line; a full file system is said as such (torch's zip
    writer reports it as "unexpected pos ..." without the errno, so the free space is checked)."""
    reason = str(e) if isinstance(e, GopdError) else describe_checkpoint_error(e)
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    chain, x = [], e
    while x is not None:
        chain.append(x)
        x = x.__cause__ or x.__context__
    full = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain)
    if (full or (free is not None and free < _FULL_DISK_BYTES)) and "no space" not in reason:
        reason = f"no space left on device ({free} bytes free): {reason}"
    return reason


# below this much free space a failed save is reported as a full disk
_FULL_DISK_BYTES = 64 << 20


def save_training_checkpoint(
    save: str | Path,
    step: int,
    *,
    model,
    optimizer,
    meta: CheckpointMeta,
    trainer_state: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Collective over all ranks. ``model`` is the bare GPTModel chunk (not the DDP wrapper).

    ``latest`` moves only onto a complete checkpoint of finite weights: non-finite weights are
    refused before anything is written, and a save that fails (a full disk, an I/O error) removes
    its partial directory and raises one :class:`GopdError` on every rank, leaving ``latest`` where
    it was. The checksums of every file are written last (:mod:`megatron_gopd.models.checksums`).
    """
    save = Path(save)
    final = iteration_dir(save, step)
    tmp = save / f".{final.name}.tmp"
    bad = _non_finite_weight(model)
    parallel.raise_any_rank_error(
        f"not saving step {step}: the student's weights are not finite ({bad} holds NaN or "
        f"inf); {_latest_of(save)}"
        if bad
        else None
    )
    try:
        _write_training_checkpoint(tmp, model, optimizer, meta, trainer_state, tokenizer_dir, step)
    except (Exception, CheckpointException) as e:
        reason = _save_failure(e, tmp)
        if parallel.is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise GopdError(
            f"cannot save the checkpoint of step {step} in {save}: {reason}; {_latest_of(save)}"
        ) from None
    error = None
    if parallel.is_rank0():
        try:
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = save / f".{LATEST_FILE}.tmp"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, save / LATEST_FILE)
        except OSError as e:
            error = (
                f"cannot publish the checkpoint of step {step} in {save}: "
                f"{_save_failure(e, save)}; {_latest_of(save)}"
            )
    parallel.raise_any_rank_error(error)  # also the barrier after the rename
    return final


def _write_training_checkpoint(tmp, model, optimizer, meta, trainer_state, tokenizer_dir, step):
    """Everything of a checkpoint into ``tmp``, checksums last. Collective; every failure is
    raised on every rank."""
    from megatron.core import dist_checkpointing

    save = tmp.parent
    error = None
    if parallel.is_rank0():
        try:
            save.mkdir(parents=True, exist_ok=True)
            for stale in save.glob(".iter_*.tmp"):  # left by an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / MODEL_SUBDIR).mkdir(parents=True)
            (tmp / OPTIM_SUBDIR).mkdir()
            (tmp / RNG_SUBDIR).mkdir()
        except OSError as e:
            error = f"cannot create {tmp}: {e.strerror or e}"
    parallel.raise_any_rank_error(error)
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save(model_sd, str(tmp / MODEL_SUBDIR))
    dist_checkpointing.save(
        optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIM_METADATA),
        str(tmp / OPTIM_SUBDIR),
    )
    error = None
    try:
        torch.save(_rng_state(), tmp / RNG_SUBDIR / f"rank_{parallel.rank():05d}.pt")
        if parallel.is_rank0():
            (tmp / META_FILE).write_text(meta.to_json())
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, tmp / TOKENIZER_SUBDIR, dirs_exist_ok=True)
            state = dict(
                trainer_state,
                step=step,
                adam_step=_adam_step(optimizer),
                world_size=parallel.world_size(),
            )
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = _save_failure(e, tmp)
    parallel.raise_any_rank_error(error)
    write_checksums(tmp)


def _materialize_torch_adam_state(optimizer) -> None:
    """Before a load, give torch's Adam the state its first step would create (zeros, step 0).

    megatron-core's distributed optimizer describes its checkpoint from its current state, and on
    the torch-Adam path (no Apex / Transformer Engine) that state does not exist before the first
    step (``DistributedOptimizer.state_dict`` then fails). The loaded values replace these zeros.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt = getattr(inner, "optimizer", None)
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p]["step"] = torch.tensor(0.0)
                    opt.state[p]["exp_avg"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


def _torch_adams(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt = getattr(inner, "optimizer", None)
        if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            yield opt


def _adam_step(optimizer) -> float | None:
    """Adam's update count (torch-Adam path), the same for every parameter."""
    steps = {
        float(st["step"])
        for opt in _torch_adams(optimizer)
        for st in opt.state.values()
        if "step" in st
    }
    return max(steps) if steps else None


def _restore_adam_steps(optimizer, step: float | None) -> None:
    """Give every parameter its own ``step`` tensor holding the saved update count.

    Two upstream problems on the torch-Adam path (no Apex / Transformer Engine; megatron-core
    0.16): the distributed optimizer's ``dp_reshardable`` checkpoint does not bring ``step`` back
    (it loads as 0), and its ``load_state_dict`` gives all parameters one shared ``step`` tensor,
    which torch's Adam then increments once per parameter. Either corrupts Adam's bias correction
    after a resume (caught by ``test_bf16_distributed_optimizer_dp2_resumes_exactly``), so the
    count is saved in ``trainer_state.json`` and set here.
    """
    if step is None:
        return
    for opt in _torch_adams(optimizer):
        for st in opt.state.values():
            if "step" in st:
                st["step"] = torch.tensor(
                    float(step), dtype=st["step"].dtype, device=st["step"].device
                )


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step")
        return state
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GopdError(f"{path} is damaged ({e}): cannot resume from it") from None


def load_training_checkpoint(load: str | Path, *, model, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; return the trainer state (step, scheduler,
    data position). Collective over all ranks. Every file is first checked against the checksums
    written at save; any damage is one :class:`GopdError` naming the file."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint(load)
    state_file = ckpt / STATE_FILE
    if not state_file.is_file() or not (ckpt / OPTIM_SUBDIR / "metadata.json").is_file():
        raise GopdError(
            f"{ckpt} is a model checkpoint, not a training checkpoint (no {STATE_FILE} / "
            f"{OPTIM_SUBDIR}/): use it as --student-load to start a new run from its weights"
        )
    verify_checksums(ckpt)
    state = _read_state(state_file)
    load_model_weights(model, ckpt, verify=False)
    _materialize_torch_adam_state(optimizer)
    opt_sd = optimizer.sharded_state_dict(
        model.sharded_state_dict(), is_loading=True, metadata=OPTIM_METADATA
    )
    try:
        loaded = dist_checkpointing.load(opt_sd, str(ckpt / OPTIM_SUBDIR))
    except (Exception, CheckpointException) as e:
        raise GopdError(
            f"cannot load the optimizer state from {ckpt / OPTIM_SUBDIR}: "
            f"{describe_checkpoint_error(e)}"
        ) from e
    optimizer.load_state_dict(loaded)
    _restore_adam_steps(optimizer, state.get("adam_step"))
    rng_file = ckpt / RNG_SUBDIR / f"rank_{parallel.rank():05d}.pt"
    world = parallel.world_size()
    rng, error = None, None
    if rng_file.is_file() and state.get("world_size") == world:
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as e:  # a damaged file: zip/pickle errors of every kind
            error = f"{rng_file} is damaged ({describe_checkpoint_error(e)}): cannot resume"
    parallel.raise_any_rank_error(error)
    if rng is not None:
        _set_rng_state(rng)
    elif parallel.is_rank0():
        log.warning(
            "RNG states not restored (saved with %s ranks, now %s)", state.get("world_size"), world
        )
    parallel.barrier()
    return state
