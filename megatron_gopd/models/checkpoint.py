"""Model checkpoints on disk: the layout, its metadata file, and dist-checkpoint I/O.

Layout (written by ``tools/convert_hf_to_megatron.py`` and by the trainer)::

    CKPT/
      gopd_model.json   architecture + the HF config.json it came from (+ tokenizer facts)
      model/            megatron-core dist checkpoint (torch_dist) of the GPTModel; loads at any TP/PP
      tokenizer/        the HF tokenizer files, when the source had them

The trainer's save directory holds ``latest`` (a file naming the newest ``iter_XXXXXXX``) and
iteration directories of the same layout; :func:`resolve_checkpoint` accepts either.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gopd import parallel
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.models.checksums import verify_checksums, write_checksums
from megatron_gopd.utils import GopdError

__all__ = [
    "FORMAT_VERSION",
    "LATEST_FILE",
    "META_FILE",
    "MODEL_SUBDIR",
    "TOKENIZER_SUBDIR",
    "CheckpointMeta",
    "describe_checkpoint_error",
    "load_model_weights",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "save_model_checkpoint",
]

META_FILE = "gopd_model.json"
MODEL_SUBDIR = "model"
TOKENIZER_SUBDIR = "tokenizer"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    arch: ModelArch
    hf_config: dict[str, Any]
    extra: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "arch": self.arch.to_dict(),
                "hf_config": self.hf_config,
                **self.extra,
            },
            indent=2,
            sort_keys=True,
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A model checkpoint directory, or a trainer save directory (its ``latest`` iteration)."""
    p = Path(path)
    if not p.exists():
        raise GopdError(f"checkpoint {p} does not exist")
    if (p / LATEST_FILE).is_file():
        try:
            it = (p / LATEST_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise GopdError(f"cannot read {p / LATEST_FILE}: {e}") from None
        p = p / it
    if not (p / META_FILE).is_file():
        raise GopdError(
            f"{p} is not a megatron_gopd checkpoint (no {META_FILE}); convert a Hugging Face model "
            f"with tools/convert_hf_to_megatron.py"
        )
    if not (p / MODEL_SUBDIR / "metadata.json").is_file():
        raise GopdError(f"{p} has no model weights ({MODEL_SUBDIR}/metadata.json is missing)")
    return p


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    p = Path(path)
    try:
        d = json.loads((p / META_FILE).read_text())
        if not isinstance(d, dict) or not isinstance(d.get("arch"), dict):
            raise ValueError("no 'arch' object")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GopdError(f"cannot read {p / META_FILE}: {e}") from None
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise GopdError(f"{p} was written by a newer megatron_gopd (format {d['format_version']})")
    try:
        arch = ModelArch.from_dict(d.pop("arch"))
    except GopdError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise GopdError(f"{p / META_FILE} does not describe a model ({e!r})") from None
    hf_config = d.pop("hf_config", {})
    d.pop("format_version", None)
    return CheckpointMeta(arch=arch, hf_config=hf_config, extra=d)


def _sharded_state_dict(model) -> dict:
    return model.sharded_state_dict()


def describe_checkpoint_error(e: BaseException) -> str:
    """One line for a failure inside dist checkpointing.

    torch's ``CheckpointException`` (a ``BaseException``: ``except Exception`` does not catch it)
    prints as "CheckpointException ranks:dict_keys([0])" followed by every rank's traceback; the
    first rank's own exception is the useful part."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(sorted(e.failures.items())))[1][0]
    text = str(e).strip().splitlines()
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device" + (f" (writing {e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def save_model_checkpoint(
    model, meta: CheckpointMeta, path: str | Path, tokenizer_dir: str | Path | None = None
) -> None:
    """Write ``path/model`` (dist checkpoint), ``path/gopd_model.json`` (+ tokenizer files) and,
    last, ``path/checksums.json``.

    Collective over all ranks. The caller handles atomicity (write to a temporary directory and
    rename) where it matters.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import CheckpointException

    path = Path(path)
    if parallel.is_rank0():
        (path / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    try:
        dist_checkpointing.save(_sharded_state_dict(model), str(path / MODEL_SUBDIR))
    except (Exception, CheckpointException) as e:
        raise GopdError(f"cannot save {path / MODEL_SUBDIR}: {describe_checkpoint_error(e)}") from e
    error = None
    if parallel.is_rank0():
        try:
            (path / META_FILE).write_text(meta.to_json())
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, path / TOKENIZER_SUBDIR, dirs_exist_ok=True)
        except OSError as e:
            error = f"cannot write {path}: {describe_checkpoint_error(e)}"
    parallel.raise_any_rank_error(error)
    write_checksums(path)


def load_model_weights(model, path: str | Path, *, verify: bool = True) -> None:
    """Load the dist checkpoint at ``path/model`` into ``model`` (any TP/PP), casting dtypes.

    Collective over all ranks. First the files are checked against the checksums written at save
    (``verify=False`` when the caller has just verified the whole directory).

    ``*._extra_state`` entries that the model asks for and the checkpoint lacks load as absent:
    Transformer Engine's modules carry one (their FP8 metadata), local-spec modules have none for
    some of them (the core attention, the q/k norms), and every checkpoint written by
    ``tools/convert_hf_to_megatron.py`` comes from the local spec. A TE module without its extra
    state starts as a fresh one would. Every other absent entry is an error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint import CheckpointException

    root = Path(path)
    ckpt = root / MODEL_SUBDIR
    if verify:
        verify_checksums(root, only=(f"{MODEL_SUBDIR}/", META_FILE))
    sharded = _sharded_state_dict(model)
    try:
        # "unexpected" in megatron's terms: asked for by the model, absent from the checkpoint.
        # RETURN_UNEXPECTED drops those from the request before torch DCP runs (the default
        # strictness hands them to DCP, which fails on the first one) and returns their keys.
        state, _, absent = dist_checkpointing.load(
            sharded, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as e:
        raise GopdError(
            f"cannot load {ckpt} into this model: {describe_checkpoint_error(e)}"
        ) from e
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    # the absent keys are this rank's: every rank raises together, none waits in a collective
    parallel.raise_any_rank_error(
        f"checkpoint {ckpt} lacks {absent[:3]}{'...' if len(absent) > 3 else ''}"
        if absent
        else None
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise GopdError(
            f"checkpoint {ckpt} lacks weights for {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
    # no checkpoint holds NaN or inf on purpose: damage that checksums did not catch (none were
    # written, or the damage predates them) is stopped here rather than trained on
    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    parallel.raise_any_rank_error(
        f"the weights loaded from {ckpt} are not finite ({bad} holds NaN or inf): the checkpoint "
        f"is damaged"
        if bad
        else None
    )
