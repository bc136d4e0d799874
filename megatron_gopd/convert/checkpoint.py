"""HF <-> Megatron checkpoint conversion (the logic behind ``tools/convert_*.py``).

Conversion runs in one process (a world of one): the model is built at TP=1/PP=1 in the checkpoint's
own dtype with random init skipped, filled through :mod:`megatron_gopd.convert.mapping`, and saved
as a megatron-core dist checkpoint, which loads at any TP/PP. Both directions write into a temporary
sibling directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from megatron_gopd.convert import mapping
from megatron_gopd.convert.hf_io import (
    HFWeights,
    atomic_output_dir,
    copy_tokenizer_files,
    tokenizer_vocab_size,
    write_hf_checkpoint,
)
from megatron_gopd.models.arch import DEFAULT_VOCAB_DIVISOR, ModelArch
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "hf_config_for"]

log = get_logger(__name__)


@contextlib.contextmanager
def _single_process_megatron():
    """Megatron model-parallel state for a world of one; reuses what the caller set up."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_gopd import parallel

    owned_dist = not dist.is_initialized()
    owned_mp = not ps.model_parallel_is_initialized()
    if not owned_dist and dist.get_world_size() != 1:
        raise GopdError("checkpoint conversion runs in a single process (not under torchrun)")
    if owned_mp:
        parallel.initialize(parallel.ParallelConfig())
    try:
        yield
    finally:
        if owned_mp:
            ps.destroy_model_parallel()
        if owned_dist:
            dist.destroy_process_group()


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GopdError(f"output {out} already exists and is not empty")


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
    padded_vocab_size: int | None = None,
) -> ModelArch:
    from megatron_gopd.models import CheckpointMeta, build_gpt, save_model_checkpoint

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise GopdError(f"{hf_dir} is not a directory")
    _check_output(out)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise GopdError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GopdError(f"{cfg_path} is not valid JSON: {e}") from None
    arch = ModelArch.from_hf_config(
        hf_config,
        vocab_divisor=vocab_divisor,
        padded_vocab_size=padded_vocab_size,
        tokenizer_vocab_size=tokenizer_vocab_size(hf_dir),
    )
    weights = HFWeights(hf_dir)
    if dtype is None and "model.embed_tokens.weight" in weights:
        # keep the dtype the weights are stored in (config.json's torch_dtype may disagree)
        dtype = weights["model.embed_tokens.weight"].dtype
    if dtype is not None:
        arch = _with_dtype(arch, dtype)
    mstate = mapping.hf_to_megatron(arch, weights)
    log.info("converting %s", arch.describe())
    with _single_process_megatron():
        model = build_gpt(arch, params_dtype=arch.dtype, initialize_weights=False, spec="local")
        _fill(model, mstate)
        del mstate
        meta = CheckpointMeta(
            arch=arch, hf_config=hf_config, extra={"source": str(hf_dir.resolve())}
        )
        with atomic_output_dir(out) as tmp:
            save_model_checkpoint(model, meta, tmp)
            copy_tokenizer_files(hf_dir, tmp / "tokenizer")
    return arch


def _with_dtype(arch: ModelArch, dtype: torch.dtype) -> ModelArch:
    import dataclasses

    return dataclasses.replace(arch, torch_dtype=str(dtype).removeprefix("torch."))


@torch.no_grad()
def _fill(model, mstate: dict[str, torch.Tensor]) -> None:
    own = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")
    }
    missing = sorted(set(own) - set(mstate))
    unexpected = sorted(set(mstate) - set(own))
    if missing or unexpected:
        raise GopdError(
            f"mapping does not cover the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k in list(mstate):
        src = mstate.pop(k)
        dst = own[k]
        if tuple(src.shape) != tuple(dst.shape):
            raise GopdError(
                f"{k}: checkpoint shape {tuple(src.shape)} != model shape {tuple(dst.shape)}"
            )
        dst.copy_(src)


def hf_config_for(arch: ModelArch) -> dict:
    """A minimal HF config.json for ``arch`` (used when a checkpoint does not carry the original)."""
    cfg = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.family,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": arch.torch_dtype,
    }
    if arch.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", **arch.rope_scaling}
    if arch.is_moe:
        cfg.update(
            num_experts=arch.num_experts,
            num_experts_per_tok=arch.moe_router_topk,
            moe_intermediate_size=arch.moe_ffn_hidden_size,
            norm_topk_prob=arch.moe_norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(arch.num_layers) if i not in arch.moe_layers],
        )
    return cfg


def megatron_state_to_hf(arch: ModelArch, model) -> dict[str, torch.Tensor]:
    """HF state dict of a TP=1/PP=1 model."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return mapping.megatron_to_hf(arch, state)


def convert_megatron_to_hf(
    load: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    from megatron_gopd.models import (
        build_gpt,
        load_model_weights,
        read_checkpoint_meta,
        resolve_checkpoint,
    )

    out = Path(out)
    _check_output(out)
    ckpt = resolve_checkpoint(load)
    meta = read_checkpoint_meta(ckpt)
    arch = meta.arch
    with _single_process_megatron():
        model = build_gpt(arch, params_dtype=arch.dtype, initialize_weights=False, spec="local")
        load_model_weights(model, ckpt)
        state = megatron_state_to_hf(arch, model)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        config = dict(meta.hf_config) if meta.hf_config else hf_config_for(arch)
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        tok = ckpt / "tokenizer"
        with atomic_output_dir(out) as tmp:
            write_hf_checkpoint(
                tmp,
                state,
                config,
                max_shard_bytes=max_shard_bytes,
                tokenizer_dir=tok if tok.is_dir() else None,
            )
    return out
