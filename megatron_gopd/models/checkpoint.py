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

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_gopd import parallel
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.utils import GopdError

__all__ = [
    "FORMAT_VERSION",
    "LATEST_FILE",
    "META_FILE",
    "MODEL_SUBDIR",
    "TOKENIZER_SUBDIR",
    "CheckpointMeta",
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
        it = (p / LATEST_FILE).read_text().strip()
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
    except (OSError, json.JSONDecodeError) as e:
        raise GopdError(f"cannot read {p / META_FILE}: {e}") from None
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise GopdError(f"{p} was written by a newer megatron_gopd (format {d['format_version']})")
    arch = ModelArch.from_dict(d.pop("arch"))
    hf_config = d.pop("hf_config", {})
    d.pop("format_version", None)
    return CheckpointMeta(arch=arch, hf_config=hf_config, extra=d)


def _sharded_state_dict(model) -> dict:
    return model.sharded_state_dict()


def save_model_checkpoint(
    model, meta: CheckpointMeta, path: str | Path, tokenizer_dir: str | Path | None = None
) -> None:
    """Write ``path/model`` (dist checkpoint) and ``path/gopd_model.json`` (+ tokenizer files).

    Collective over all ranks. The caller handles atomicity (write to a temporary directory and
    rename) where it matters.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if parallel.is_rank0():
        (path / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    dist_checkpointing.save(_sharded_state_dict(model), str(path / MODEL_SUBDIR))
    if parallel.is_rank0():
        (path / META_FILE).write_text(meta.to_json())
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, path / TOKENIZER_SUBDIR, dirs_exist_ok=True)
    parallel.barrier()


def load_model_weights(model, path: str | Path) -> None:
    """Load the dist checkpoint at ``path/model`` into ``model`` (any TP/PP), casting dtypes."""
    from megatron.core import dist_checkpointing

    ckpt = Path(path) / MODEL_SUBDIR
    sharded = _sharded_state_dict(model)
    try:
        state = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as e:  # megatron raises several types for shape/key problems
        raise GopdError(f"cannot load {ckpt} into this model: {str(e).splitlines()[0]}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise GopdError(
            f"checkpoint {ckpt} lacks weights for {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
