"""Megatron-Core <-> Hugging Face weight names and layouts: the single source of truth.

Used by the conversion tools (whole state dicts) and by weight sync (one parameter at a time, from
TP shards). Llama, Qwen2 and Qwen3 share one layout; the differences are flags of the
:class:`~megatron_gopd.models.arch.ModelArch` (q/k/v bias for Qwen2, q/k RMSNorm for Qwen3, tied
embeddings).

Layouts that are not a rename:

* **QKV.** Megatron fuses q, k, v into ``linear_qkv`` grouped by key/value head: for each of the
  ``G`` query groups, its ``H/G`` query heads, then its key head, then its value head
  (``[G, (H/G + 2) * d, hidden]``). Tensor parallelism splits the groups contiguously, so the
  concatenation of the TP shards along dim 0 is the full fused tensor.
* **gate/up.** ``linear_fc1`` is ``[gate; up]`` on every TP rank *separately*, so the gathered
  shards read ``[g0; u0; g1; u1; ...]`` and must be de-interleaved (:func:`merge_tp_shards`).
* **Vocabulary.** Megatron's embedding and output layer have ``padded_vocab_size`` rows; the extra
  rows are zero on import and stripped on export.
* **Experts** (Qwen3-MoE). HF's router ``mlp.gate.weight`` is megatron's ``mlp.router.weight``;
  expert ``j``'s gate/up/down projections are ``mlp.experts.local_experts.{j}.linear_fc1`` (``[gate;
  up]``, like a dense ``linear_fc1``) and ``linear_fc2``. Names here use *global* expert indices
  (a model at expert parallelism EP holds experts ``[r * E / EP, (r + 1) * E / EP)`` as its local
  experts ``0 .. E / EP - 1``; megatron's dist checkpoints store global indices).

Megatron names are module names of the local layer spec with *global* layer indices. Transformer
Engine fuses the pre-attention and pre-MLP RMSNorm weights into the following linear layer
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); :func:`canonical_name` maps
those to the local names, so both specs map through the same table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

from megatron_gopd.models.arch import ModelArch
from megatron_gopd.utils import GopdError

__all__ = [
    "MappingError",
    "canonical_name",
    "expected_hf_shapes",
    "fuse_qkv",
    "hf_to_megatron",
    "megatron_param_to_hf",
    "megatron_to_hf",
    "merge_tp_shards",
    "split_qkv",
    "tp_partition_dim",
]


class MappingError(GopdError):
    pass


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

# per-layer renames (megatron suffix -> hf suffix) that need no layout change
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}

# Which dim TP splits ("column" parallel = out-features = dim 0; "row" parallel = dim 1); None =
# replicated on every TP rank.
_TP_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.final_layernorm.weight": None,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "mlp.router.weight": None,
    "mlp.experts.linear_fc1.weight": 0,  # every expert (the expert index is dropped)
    "mlp.experts.linear_fc2.weight": 1,
}


def canonical_name(name: str) -> str:
    """Local-spec name for a megatron parameter name (TE aliases resolved, wrappers stripped)."""
    for prefix in ("module.", "model."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    m = _LAYER.match(name)
    if m and m.group(2) in _TE_ALIASES:
        return f"decoder.layers.{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return name


def _split(name: str) -> tuple[int | None, str]:
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def _expert(suffix: str) -> tuple[int | None, str]:
    """``mlp.experts.local_experts.{j}.linear_fc1.weight`` -> ``(j, "linear_fc1.weight")``."""
    m = _EXPERT.match(suffix)
    return (int(m.group(1)), m.group(2)) if m else (None, suffix)


def tp_partition_dim(name: str) -> int | None:
    """The dim along which tensor parallelism splits this (canonical) megatron parameter."""
    _, suffix = _split(canonical_name(name))
    j, rest = _expert(suffix)
    if j is not None:
        suffix = "mlp.experts." + rest
    if suffix not in _TP_DIM:
        raise MappingError(f"no TP layout known for megatron parameter {name!r}")
    return _TP_DIM[suffix]


# ---------------------------------------------------------------------------------- QKV


def fuse_qkv(arch: ModelArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights ``[out, hidden]`` or biases ``[out]``) -> megatron ``linear_qkv``."""
    g, d = arch.num_query_groups, arch.head_dim
    per = arch.num_attention_heads // g
    rest = q.shape[1:]
    qg = q.reshape(g, per * d, *rest)
    kg = k.reshape(g, d, *rest)
    vg = v.reshape(g, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * d, *rest)


def split_qkv(arch: ModelArch, qkv: torch.Tensor, num_groups: int | None = None):
    """megatron ``linear_qkv`` (full, or one TP shard holding ``num_groups`` groups) -> q, k, v."""
    g = num_groups or arch.num_query_groups
    d = arch.head_dim
    per = arch.num_attention_heads // arch.num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest))


# ---------------------------------------------------------------------------------- shapes


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``arch`` must have, with its shape."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    out = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if i in arch.moe_layers:
            e, fe = arch.num_experts, arch.moe_ffn_hidden_size
            out[p + "mlp.gate.weight"] = (e, h)
            for j in range(e):
                x = f"{p}mlp.experts.{j}."
                out.update(
                    {
                        x + "gate_proj.weight": (fe, h),
                        x + "up_proj.weight": (fe, h),
                        x + "down_proj.weight": (h, fe),
                    }
                )
        else:
            out.update(
                {
                    p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                }
            )
        if arch.qkv_bias:
            out.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if arch.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return out


def check_hf_state(arch: ModelArch, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one clear error for missing tensors or mismatched shapes."""
    want = expected_hf_shapes(arch)
    missing = [k for k in want if k not in shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MappingError(
            f"the checkpoint lacks {missing[0]}{more} (missing or incomplete shards?)"
        )
    for k, shape in want.items():
        if tuple(shapes[k]) != shape:
            raise MappingError(
                f"{k} has shape {tuple(shapes[k])}, config.json implies {shape}: the weights do not "
                f"match the config"
            )


# ---------------------------------------------------------------------------------- HF -> megatron


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)


def hf_to_megatron(arch: ModelArch, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (unsharded) HF state dict -> megatron local-spec state dict, global layer indices.

    ``hf`` may be a lazy mapping (tensors read on access); every tensor is read once.
    """
    check_hf_state(arch, dict(_shapes(hf)))
    out: dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": _pad_rows(
            hf["model.embed_tokens.weight"], arch.padded_vocab_size
        ),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], arch.padded_vocab_size)
    for i in range(arch.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        moe = i in arch.moe_layers
        for msuf, hsuf in _LAYER_RENAMES.items():
            if _applies(arch, msuf, moe):
                out[m + msuf] = hf[p + hsuf]
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            arch,
            hf[p + "self_attn.q_proj.weight"],
            hf[p + "self_attn.k_proj.weight"],
            hf[p + "self_attn.v_proj.weight"],
        )
        if arch.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                arch,
                hf[p + "self_attn.q_proj.bias"],
                hf[p + "self_attn.k_proj.bias"],
                hf[p + "self_attn.v_proj.bias"],
            )
        if not moe:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0
            )
            continue
        out[m + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
        for j in range(arch.num_experts):
            x, y = f"{p}mlp.experts.{j}.", f"{m}mlp.experts.local_experts.{j}."
            out[y + "linear_fc1.weight"] = torch.cat(
                [hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]], dim=0
            )
            out[y + "linear_fc2.weight"] = hf[x + "down_proj.weight"]
    return out


def _applies(arch: ModelArch, megatron_suffix: str, moe: bool) -> bool:
    if megatron_suffix.startswith(("self_attention.q_layernorm", "self_attention.k_layernorm")):
        return arch.qk_norm
    if megatron_suffix == "mlp.linear_fc2.weight":
        return not moe  # an MoE layer's down projections are per expert
    return True


def _shapes(hf: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Size]]:
    shape_of = getattr(hf, "shape_of", None)
    for k in hf:
        yield k, tuple(shape_of(k) if shape_of else hf[k].shape)


# ---------------------------------------------------------------------------------- megatron -> HF


def megatron_param_to_hf(
    arch: ModelArch, name: str, tensor: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """One full (TP-merged) megatron parameter -> its HF tensor(s).

    ``name`` has a global layer index. Returns ``[]`` for parameters HF does not store separately
    (the output layer of a tied model).
    """
    name = canonical_name(name)
    layer, suffix = _split(name)
    if layer is None:
        if name == "embedding.word_embeddings.weight":
            return [("model.embed_tokens.weight", tensor[: arch.vocab_size])]
        if name == "output_layer.weight":
            return (
                [] if arch.tie_word_embeddings else [("lm_head.weight", tensor[: arch.vocab_size])]
            )
        if name == "decoder.final_layernorm.weight":
            return [("model.norm.weight", tensor)]
        raise MappingError(f"unknown megatron parameter {name!r}")
    p = f"model.layers.{layer}."
    j, rest = _expert(suffix)
    if j is not None:
        x = f"{p}mlp.experts.{j}."
        if rest == "linear_fc2.weight":
            return [(x + "down_proj.weight", tensor)]
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(x + "gate_proj.weight", gate), (x + "up_proj.weight", up)]
    if suffix == "mlp.router.weight":
        return [(p + "mlp.gate.weight", tensor)]
    if suffix in _LAYER_RENAMES:
        return [(p + _LAYER_RENAMES[suffix], tensor)]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = split_qkv(arch, tensor)
        return [
            (p + f"self_attn.q_proj.{kind}", q),
            (p + f"self_attn.k_proj.{kind}", k),
            (p + f"self_attn.v_proj.{kind}", v),
        ]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up)]
    raise MappingError(f"unknown megatron parameter {name!r}")


def megatron_to_hf(arch: ModelArch, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full megatron state dict (global layer indices) -> HF state dict (contiguous tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        for k, v in megatron_param_to_hf(arch, name, t):
            out[k] = v.contiguous()
    check_hf_state(arch, {k: tuple(v.shape) for k, v in out.items()})
    return out


def merge_tp_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """TP shards of one megatron parameter (in TP-rank order) -> the full parameter."""
    if len(shards) == 1:
        return shards[0]
    dim = tp_partition_dim(name)
    if dim is None:
        return shards[0]
    if canonical_name(name).endswith("linear_fc1.weight"):  # dense MLP or one expert
        # each rank holds [gate_r; up_r]: re-assemble [gate; up]
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)
