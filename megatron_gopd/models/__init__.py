"""The models of a job: architectures read from Hugging Face configs, Megatron-Core GPT models per
role, and their checkpoints.

* :mod:`~megatron_gopd.models.arch`: :class:`ModelArch`, one model's architecture (Llama, Qwen2,
  Qwen3) from its HF ``config.json``, with the checks that refuse what we do not support.
* :mod:`~megatron_gopd.models.build`: ``GPTModel`` per role (student, teacher, reference) under
  the current TP/PP layout; frozen roles; the vocabulary compatibility check.
* :mod:`~megatron_gopd.models.checkpoint`: the checkpoint layout, its metadata, dist-checkpoint
  save and load.
* :mod:`~megatron_gopd.models.checksums`: ``checksums.json`` of a checkpoint, written at save and
  verified at load.
"""

from megatron_gopd.models.arch import ArchError, ModelArch
from megatron_gopd.models.build import RoleModel, build_gpt, build_role, check_vocab_compatible
from megatron_gopd.models.checkpoint import (
    CheckpointMeta,
    load_model_weights,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_model_checkpoint,
)

__all__ = [
    "ArchError",
    "CheckpointMeta",
    "ModelArch",
    "RoleModel",
    "build_gpt",
    "build_role",
    "check_vocab_compatible",
    "load_model_weights",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "save_model_checkpoint",
]
