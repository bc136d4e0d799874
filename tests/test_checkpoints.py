"""Checkpoints meet the GPU stack and the real world: Transformer Engine's ``_extra_state``,
torch's ``CheckpointException``, corrupted, truncated and half-written files, a full disk.

Transformer Engine cannot be installed without CUDA, so its modules are emulated where it matters:
TE's layers carry an ``_extra_state`` (their FP8 metadata, a uint8 tensor) that megatron-core turns
into ``*._extra_state`` ShardedObjects, for modules whose local counterparts have none (the core
attention in megatron-core <= 0.14, ``TENorm`` for the q/k norms) and for the linears (where the
local ones save ``None``). :func:`_as_transformer_engine` gives the local modules of a built model
exactly that behaviour by swapping their classes for subclasses that define it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import RankFailure, run_distributed
from tests.e2e_utils import make_world, train_args

FP8_META = {"scale_fwd": [1.0, 1.0], "amax_history_fwd": [[0.5, 0.25]], "recipe": "delayed"}


def _extra_state_tensor(payload: dict | None) -> torch.Tensor:
    """What TE's ``get_extra_state`` returns: the pickled FP8 metadata as uint8 (empty without
    FP8)."""
    if payload is None:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8)


def _te_like(base: type, payload: dict | None, state_dict_sharding: bool = False) -> type:
    def get_extra_state(self):
        return _extra_state_tensor(payload)

    def set_extra_state(self, state):
        self.loaded_extra_state = state

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # megatron-core <= 0.14's TEDotProductAttention: the module's whole state dict, extra
        # state included (0.15+ emits nothing without a learnable softmax offset)
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(sd, prefix, {}, sharded_offsets)

    attrs = {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state}
    if state_dict_sharding:
        attrs["sharded_state_dict"] = sharded_state_dict
    return type(f"TELike{base.__name__}", (base,), attrs)


def _as_transformer_engine(model, payload: dict | None = None) -> int:
    """Swap the classes of ``model``'s modules for TE-like ones (see the module docstring);
    returns how many modules now carry an ``_extra_state`` they did not have before."""
    added = 0
    for layer in model.decoder.layers:
        attn = layer.self_attention
        attn.core_attention.__class__ = _te_like(type(attn.core_attention), None, True)
        added += 1
        for norm in ("q_layernorm", "k_layernorm"):
            m = getattr(attn, norm)
            if isinstance(m, torch.nn.RMSNorm):
                m.__class__ = _te_like(type(m), payload)
                added += 1
        for lin in (attn.linear_qkv, attn.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2):
            lin.__class__ = _te_like(type(lin), payload)
    return added


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def converted(world):
    """A tiny Qwen3 (4 layers, q/k norms): ``hf`` its HF form, ``mc`` converted (local spec)."""
    return {"hf": world["teacher"].parent / "hf" / "teacher", "mc": world["teacher"]}


# ---------------------------------------------------------------------------------- TE extra state


def _load_into_te_like_model(ckpt: str, reference: str, bogus: bool):
    from megatron_gopd.models import build_gpt, load_model_weights, read_checkpoint_meta

    arch = read_checkpoint_meta(ckpt).arch
    model = build_gpt(arch, spec="local", seed=11)
    added = _as_transformer_engine(model)
    if bogus:  # a real weight the checkpoint does not have: must still be an error
        model.decoder.final_layernorm.register_parameter(
            "bias", torch.nn.Parameter(torch.zeros(arch.hidden_size))
        )
    requested = [k for k in model.sharded_state_dict() if k.endswith("_extra_state")]
    load_model_weights(model, ckpt)
    plain = build_gpt(arch, spec="local", seed=12)
    load_model_weights(plain, reference)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    same = all(torch.equal(v, plain.state_dict()[k]) for k, v in ours.items())
    return dict(added=added, requested=len(requested), same=same, n=len(ours))


def test_local_checkpoint_loads_into_transformer_engine_modules(converted):
    """Student, teachers and reference are converted with the local spec and built with TE on
    GPUs: the ``_extra_state`` the TE modules ask for is absent from the checkpoint, which is fine
    (TE starts without FP8 history), and every weight loads, at TP=2 too."""
    mc = str(converted["mc"])
    for world in (1, 2):
        outs = run_distributed(
            _load_into_te_like_model, world, mc, mc, False, parallel=ParallelConfig(world, 1)
        )
        for o in outs:
            assert o["added"] > 0 and o["requested"] > o["added"]  # the emulation is in effect
            assert o["same"] and o["n"] > 10, o


def test_only_extra_state_may_be_absent(converted):
    """A real tensor the checkpoint lacks stays an error (one line, naming it), even though
    absent ``_extra_state`` entries are allowed."""
    from megatron_gopd.utils import GopdError

    mc = str(converted["mc"])
    with pytest.raises(RankFailure) as e:
        run_distributed(
            _load_into_te_like_model, 2, mc, mc, True, parallel=ParallelConfig(2, 1), timeout=120
        )
    msg = str(e.value)
    assert GopdError.__name__ in msg and "decoder.final_layernorm.bias" in msg, msg[-3000:]
    assert "_extra_state" not in msg.split("GopdError")[-1].splitlines()[0]


def _save_te_trained(ckpt: str, out: str):
    """A checkpoint as a TE-built student saves it: every TE module's ``_extra_state`` with its
    FP8 metadata."""
    from megatron_gopd.models import (
        build_gpt,
        load_model_weights,
        read_checkpoint_meta,
        save_model_checkpoint,
    )

    meta = read_checkpoint_meta(ckpt)
    model = build_gpt(meta.arch, spec="local", seed=11)
    _as_transformer_engine(model, payload=FP8_META)
    load_model_weights(model, ckpt)
    save_model_checkpoint(model, meta, out)
    return sorted(k for k in model.sharded_state_dict() if k.endswith("_extra_state"))


def _export(ckpt: str, out: str) -> None:
    from megatron_gopd.convert.checkpoint import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out)


def test_transformer_engine_checkpoint_converts_back_to_hf(converted, tmp_path):
    """A checkpoint written by TE modules (FP8 metadata in ``_extra_state``, saved at TP=2) exports
    to the same HF weights, bit for bit."""
    te = tmp_path / "te_trained"
    keys = run_distributed(
        _save_te_trained, 2, str(converted["mc"]), str(te), parallel=ParallelConfig(2, 1)
    )[0]
    assert any("core_attention._extra_state" in k for k in keys)
    assert any("q_layernorm._extra_state" in k for k in keys)
    run_distributed(_export, 1, str(te), str(tmp_path / "hf"))
    a = load_file(converted["hf"] / "model.safetensors")
    b = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 4


# ---------------------------------------------------------------------------------- load errors


def _load(ckpt: str):
    from megatron_gopd.models import build_role

    build_role("teacher", ckpt, frozen=True)


def _one_line_gopd_error(failure: RankFailure) -> str:
    """The GopdError line of a failed rank (and that it is one, not a CheckpointException)."""
    text = str(failure)
    lines = [ln for ln in text.splitlines() if ln.startswith("megatron_gopd.utils.GopdError: ")]
    assert lines, text[-3000:]
    return lines[-1].removeprefix("megatron_gopd.utils.GopdError: ")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_distcp_is_one_line_error(converted, tmp_path):
    """torch's CheckpointException derives from BaseException: it escaped ``except Exception``
    and reached the user as a traceback. A checkpoint without checksums (written before they
    existed) shows the DCP failure itself, in one line."""
    bad = _copy(converted["mc"], tmp_path / "bad")
    (bad / "checksums.json").unlink(missing_ok=True)
    shard = sorted((bad / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(RankFailure) as e:
        run_distributed(_load, 1, str(bad), parallel=ParallelConfig(), timeout=120)
    line = _one_line_gopd_error(e.value)
    assert str(bad / "model") in line, line


# ---------------------------------------------------------------------------------- training


def _student_and_optimizer(ckpt: str):
    from megatron_gopd.models import build_role
    from megatron_gopd.trainer.update import OptimConfig, build_optimizer

    role = build_role("student", ckpt, frozen=False)
    return role, build_optimizer(role.model, OptimConfig(lr=1e-2), train_iters=10, bf16=False)


def _step(role, opt, poison: bool = False) -> dict[str, float]:
    """One update on two hand-made samples; ``poison``: one teacher log-prob is NaN (what a
    damaged teacher or student produces), which makes the loss and every gradient NaN."""
    from megatron_gopd.gopd import GOPDLossConfig
    from megatron_gopd.trainer.update import collate, train_step
    from megatron_gopd.types import Sample

    teacher = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    if poison:
        teacher[2] = float("nan")
    samples = [
        Sample([1, 2, 3], [4, 5, 6, 7], teacher_logprobs_T=teacher),
        Sample([3, 2], [8, 9, 10, 11], teacher_logprobs_T=teacher.clone()),
    ]
    batch = collate(samples, domains=["default"], lam_of=lambda d: 1.0, with_ref=False)
    _, stats = train_step(
        opt, batch, micro_batch_size=2, loss_cfg=GOPDLossConfig(), vocab_size=role.arch.vocab_size
    )
    return stats


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _non_finite_gradient_skips_the_update(ckpt: str):
    role, opt = _student_and_optimizer(ckpt)
    before = _params(role.model)
    poisoned = _step(role, opt, poison=True)
    after_poison = _params(role.model)
    lr_steps = opt.scheduler.num_steps
    clean = _step(role, opt)
    after_clean = _params(role.model)
    return dict(
        poisoned=poisoned,
        clean=clean,
        unchanged=all(torch.equal(before[k], after_poison[k]) for k in before),
        lr_steps_after_poison=lr_steps,
        changed_by_clean=any(not torch.equal(before[k], after_clean[k]) for k in before),
        finite=all(torch.isfinite(v).all().item() for v in after_clean.values()),
    )


def test_non_finite_gradient_norm_skips_the_update(world):
    """As Megatron's optimizer does with a loss scaler: a NaN/inf gradient norm skips the step
    (weights, Adam state and LR schedule untouched) and is counted; the next finite step trains.
    Before, the NaN went into Adam and every weight became NaN."""
    (r,) = run_distributed(
        _non_finite_gradient_skips_the_update, 1, str(world["student"]), parallel=ParallelConfig()
    )
    assert r["poisoned"]["optim/update_skipped"] == 1.0
    assert r["poisoned"]["optim/grad_norm"] != r["poisoned"]["optim/grad_norm"]  # NaN
    assert r["unchanged"], "a skipped update changed the weights"
    assert r["lr_steps_after_poison"] == 0
    assert r["clean"]["optim/update_skipped"] == 0.0 and r["changed_by_clean"] and r["finite"]


def _save(save: str, step: int, role, opt):
    from megatron_gopd.models import read_checkpoint_meta
    from megatron_gopd.trainer.checkpointing import save_training_checkpoint

    save_training_checkpoint(
        save,
        step,
        model=role.model,
        optimizer=opt.optimizer,
        meta=read_checkpoint_meta(role.checkpoint),
        trainer_state={"scheduler": opt.scheduler.state_dict(), "data": {}},
    )


def _save_then_poison_weights(ckpt: str, save: str):
    from megatron_gopd.utils import GopdError

    role, opt = _student_and_optimizer(ckpt)
    _step(role, opt)
    _save(save, 1, role, opt)
    with torch.no_grad():
        next(role.model.parameters())[0] = float("nan")
    try:
        _save(save, 2, role, opt)
    except GopdError as e:
        return str(e)
    return None


def test_latest_never_moves_onto_non_finite_weights(world, tmp_path):
    save = tmp_path / "run"
    (error,) = run_distributed(
        _save_then_poison_weights, 1, str(world["student"]), str(save), parallel=ParallelConfig()
    )
    assert error is not None and "not finite" in error and "iter_0000001" in error, error
    assert (save / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest"]


def _resume(ckpt: str, save: str):
    from megatron_gopd.trainer.checkpointing import load_training_checkpoint
    from megatron_gopd.utils import GopdError

    role, opt = _student_and_optimizer(ckpt)
    try:
        return "ok", load_training_checkpoint(save, model=role.model, optimizer=opt.optimizer)
    except GopdError as e:
        return "error", str(e)


def _save_one(ckpt: str, save: str) -> None:
    role, opt = _student_and_optimizer(ckpt)
    _step(role, opt)
    _save(save, 1, role, opt)


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    save = tmp_path_factory.mktemp("saved") / "run"
    run_distributed(_save_one, 1, str(world["student"]), str(save), parallel=ParallelConfig())
    return save


def _damage(save: Path, tmp_path: Path, name: str, how: str, checksums: bool = True) -> Path:
    run = _copy(save, tmp_path / "run")
    it = run / "iter_0000001"
    if not checksums:
        (it / "checksums.json").unlink(missing_ok=True)
    path = sorted(it.glob(name))[-1]  # the file names differ between megatron-core versions
    data = bytearray(path.read_bytes())
    if how == "garbage":  # 4 KiB of garbage in the middle (bit rot, a bad copy)
        mid = len(data) // 2
        data[mid : mid + 4096] = bytes(range(256)) * 16
        data = data[: len(path.read_bytes())]
    else:  # truncated (a copy or a save cut short)
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "name,how",
    [
        ("model/*.distcp", "garbage"),
        ("optim/*.distcp", "truncated"),
        ("model/.metadata", "truncated"),
        ("trainer_state.json", "truncated"),
        ("rng/rank_00000.pt", "garbage"),
    ],
)
def test_damaged_checkpoint_is_one_line_error_naming_the_file(world, saved, tmp_path, name, how):
    damaged = _damage(saved, tmp_path, name, how)
    ((status, msg),) = run_distributed(
        _resume, 1, str(world["student"]), str(tmp_path / "run"), parallel=ParallelConfig()
    )
    assert status == "error" and str(damaged) in msg and "corrupted" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "name,how,needle",
    [
        ("trainer_state.json", "truncated", "trainer_state.json"),
        ("rng/rank_00000.pt", "truncated", "rank_00000.pt"),
        ("optim/*.distcp", "truncated", "optim"),
    ],
)
def test_damaged_checkpoint_without_checksums_is_one_line_error(
    world, saved, tmp_path, name, how, needle
):
    """Checkpoints written before checksums existed: the failure itself, in one line."""
    _damage(saved, tmp_path, name, how, checksums=False)
    ((status, msg),) = run_distributed(
        _resume, 1, str(world["student"]), str(tmp_path / "run"), parallel=ParallelConfig()
    )
    assert status == "error" and needle in msg, msg
    assert "\n" not in msg


def test_intact_checkpoint_resumes(world, saved):
    ((status, state),) = run_distributed(
        _resume, 1, str(world["student"]), str(saved), parallel=ParallelConfig()
    )
    assert status == "ok" and state["step"] == 1
    listed = json.loads((saved / "iter_0000001" / "checksums.json").read_text())["files"]
    on_disk = {
        str(p.relative_to(saved / "iter_0000001"))
        for p in (saved / "iter_0000001").rglob("*")
        if p.is_file() and p.name != "checksums.json"
    }
    assert set(listed) == on_disk and "model/.metadata" in on_disk


def _full_disk(ckpt: str, save: str, size_bytes: int):
    """Save twice into a file system that holds one checkpoint: a private tmpfs of
    ``size_bytes``, mounted in a mount namespace of this rank only."""
    import ctypes
    import os

    from megatron_gopd.utils import GopdError

    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
    if libc.unshare(CLONE_NEWNS) != 0:
        return "no-namespace", os.strerror(ctypes.get_errno())
    libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
    os.makedirs(save, exist_ok=True)
    opts = f"size={size_bytes}".encode()
    if libc.mount(b"tmpfs", save.encode(), b"tmpfs", 0, opts) != 0:
        return "no-mount", os.strerror(ctypes.get_errno())
    role, opt = _student_and_optimizer(ckpt)
    _step(role, opt)
    _save(save, 1, role, opt)
    _step(role, opt)
    try:
        _save(save, 2, role, opt)
        outcome = ("saved", "")
    except GopdError as e:
        outcome = ("error", str(e))
    left = sorted(p for p in os.listdir(save))
    latest = Path(save, "latest").read_text().strip()
    resumed = _resume(ckpt, save)[0]
    return outcome, left, latest, resumed


def test_full_disk_during_save_says_so(world, saved, tmp_path):
    """ENOSPC in the middle of a save: one line saying the disk is full, ``latest`` still on the
    previous checkpoint (which still loads), and the partial one removed."""
    import os

    size = sum(p.stat().st_size for p in (saved / "iter_0000001").rglob("*") if p.is_file())
    (result,) = run_distributed(
        _full_disk,
        1,
        str(world["student"]),
        str(tmp_path / "run"),
        int(size * 1.5),
        parallel=ParallelConfig(),
    )
    if result[0] in ("no-namespace", "no-mount"):
        if os.geteuid() != 0:  # CI runs as root; a mount namespace needs CAP_SYS_ADMIN
            pytest.skip(f"a private tmpfs needs root here: {result}")
        pytest.fail(f"cannot mount a private tmpfs as root: {result}")
    outcome, left, latest, resumed = result
    assert outcome[0] == "error" and "no space left on device" in outcome[1], outcome
    assert "\n" not in outcome[1]
    assert latest == "iter_0000001" and left == ["iter_0000001", "latest"], left
    assert resumed == "ok"


# ---------------------------------------------------------------------------------- end to end


def test_single_process_run_then_damaged_resume(world, tmp_path):
    """The issue's case as a user meets it: ``gopd-train`` in one process (no torchrun), then 4 KiB
    of garbage in a saved ``model/*.distcp`` and a resume: it used to exit 0 and train on NaN; now
    it is one line naming the file, exit status 2, and ``latest`` does not move."""
    import os
    import subprocess
    import sys

    gopd_train = str(Path(sys.executable).parent / "gopd-train")
    save = tmp_path / "run"
    args = [
        *train_args(world, save, "--teacher-load", str(world["teacher"]), steps=1),
        *("--tensor-model-parallel-size", "1", "--eval-interval", "0"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.run(
        [gopd_train, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (save / "latest").read_text().strip() == "iter_0000001"
    shard = sorted((save / "iter_0000001" / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    shard.write_bytes(bytes(data[: shard.stat().st_size]))
    resumed = subprocess.run(
        [gopd_train, *args, "--train-iters", "2", "--load", str(save)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint file") and str(shard) in last, last
    assert (save / "latest").read_text().strip() == "iter_0000001"
