"""Model architecture: one typed description, derived from a Hugging Face ``config.json``.

A :class:`ModelArch` is everything needed to build the Megatron-Core ``GPTModel`` of a role and to
map its weights to and from Hugging Face names. Converted checkpoints store it (``gopd_model.json``),
so loading needs no repeated model flags.

Supported: dense Llama (incl. Llama-3 rope scaling), Qwen2 and Qwen3 decoder-only models: GQA,
SwiGLU, RMSNorm, RoPE, Qwen2 q/k/v bias, Qwen3 q/k RMSNorm and explicit ``head_dim``, tied or
untied embeddings; and Qwen3-MoE (``qwen3_moe``): Qwen3 attention with routed SwiGLU experts, a
softmax top-k router (``norm_topk_prob`` renormalises the k weights), no shared expert, and dense
MLP layers where ``mlp_only_layers`` / ``decoder_sparse_step`` put them. Anything else is refused
with a message that names the unsupported field.

Both spellings of the RoPE fields are read: transformers 4.x (``rope_theta`` + ``rope_scaling``)
and 5.x (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gopd.utils import GopdError

__all__ = ["ArchError", "ModelArch", "pad_vocab_size"]

# HF architecture class -> our family name. The mapping module keys on the family.
_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
# MoE fields of HF configs whose non-default value we cannot build (shared experts: Qwen2-MoE,
# DeepSeek; expert biases / grouped routing: DeepSeek-V3): each is refused by name.
_UNSUPPORTED_MOE = {
    "shared_expert_intermediate_size": 0,
    "n_shared_experts": 0,
    "moe_shared_expert_intermediate_size": 0,
    "n_group": 1,
    "topk_group": 1,
}

# Megatron pads the embedding rows so that every TP rank holds an equal, aligned slice. We pad to
# a multiple of 128 * 8 by default, independent of the TP size used at conversion time, so that one
# converted checkpoint loads at TP 1, 2, 4 and 8 without resizing (Megatron-LM's own default pads
# to 128 * TP, which ties a checkpoint to its TP size).
DEFAULT_VOCAB_DIVISOR = 1024


class ArchError(GopdError, ValueError):
    """An HF config we cannot build faithfully. The message names the field."""


def pad_vocab_size(vocab_size: int, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
    return int(math.ceil(vocab_size / divisor) * divisor)


@dataclass(frozen=True)
class ModelArch:
    family: str  # "llama" | "qwen2" | "qwen3"
    hf_architecture: str  # e.g. "Qwen3ForCausalLM"
    vocab_size: int  # rows of the HF embedding (HF's own padding included)
    padded_vocab_size: int  # rows in Megatron (>= vocab_size); extra rows are masked out
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str = "float32"
    # Llama-3 style: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    # len(tokenizer) when the HF directory had a tokenizer; used by the vocabulary check.
    tokenizer_vocab_size: int | None = None
    # Mixture of experts (0 experts: a dense model). ``moe_layers``: the layers whose MLP is the
    # routed-expert block (the others are dense with ``ffn_hidden_size``).
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_config(
        cls,
        cfg: dict[str, Any],
        *,
        vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
        padded_vocab_size: int | None = None,
        tokenizer_vocab_size: int | None = None,
    ) -> ModelArch:
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        hf_arch = next((a for a in archs if a in _FAMILIES), None)
        if hf_arch is None and model_type in _MODEL_TYPES:
            family = _MODEL_TYPES[model_type]
            hf_arch = {v: k for k, v in _FAMILIES.items()}[family]
        if hf_arch is None:
            raise ArchError(
                f"unsupported architecture {archs or model_type!r}: supported are "
                f"{', '.join(sorted(_FAMILIES))}"
            )
        family = _FAMILIES[hf_arch]

        def need(key):
            if key not in cfg:
                raise ArchError(f"config.json of a {hf_arch} has no {key!r}")
            return cfg[key]

        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act != "silu":
            raise ArchError(f"hidden_act={act!r} is not supported (only SwiGLU with 'silu')")
        if cfg.get("mlp_bias"):
            raise ArchError("mlp_bias=true is not supported")
        if family in ("llama", "qwen3") and cfg.get("attention_bias"):
            raise ArchError(
                "attention_bias=true (bias on q/k/v and o_proj) is not supported; "
                "Megatron's add_qkv_bias covers q/k/v only"
            )
        if cfg.get("use_sliding_window"):
            raise ArchError("use_sliding_window=true is not supported (full attention only)")
        layer_types = cfg.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ArchError(
                f"layer_types other than full_attention are not supported: {set(layer_types)}"
            )
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        if experts and family != "qwen3_moe":
            raise ArchError(
                f"num_experts={experts}: mixture-of-experts {hf_arch} is not supported (MoE: "
                f"Qwen3MoeForCausalLM only)"
            )
        moe = _parse_moe(cfg, hf_arch, experts) if family == "qwen3_moe" else {}

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ArchError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )

        rope_theta, rope_scaling = _parse_rope(cfg)
        vocab = int(need("vocab_size"))
        padded = padded_vocab_size or pad_vocab_size(vocab, vocab_divisor)
        if padded < vocab:
            raise ArchError(f"padded_vocab_size={padded} is smaller than vocab_size={vocab}")
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if isinstance(dtype, str) and dtype.startswith("torch."):
            dtype = dtype[len("torch.") :]
        return cls(
            family=family,
            hf_architecture=hf_arch,
            vocab_size=vocab,
            padded_vocab_size=padded,
            hidden_size=hidden,
            ffn_hidden_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_query_groups=kv_heads,
            head_dim=int(head_dim),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            qk_norm=family in ("qwen3", "qwen3_moe"),
            torch_dtype=str(dtype),
            rope_scaling=rope_scaling,
            tokenizer_vocab_size=tokenizer_vocab_size,
            **moe,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, **kw) -> ModelArch:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ArchError(f"{path} has no config.json: not a Hugging Face model directory")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ArchError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls.from_hf_config(cfg, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArch:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ArchError(
                f"unknown architecture field(s) {sorted(unknown)} (written by a newer version?)"
            )
        d = dict(d)
        if "moe_layers" in d:  # a JSON list
            d["moe_layers"] = tuple(int(i) for i in d["moe_layers"])
        return cls(**d)

    # ------------------------------------------------------------------ derived

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.torch_dtype)

    @property
    def token_vocab_size(self) -> int:
        """How many token ids the tokenizer can produce (for the vocabulary check)."""
        return self.tokenizer_vocab_size or self.vocab_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def describe(self) -> str:
        text = (
            f"{self.hf_architecture}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"ffn {self.ffn_hidden_size}, heads {self.num_attention_heads}/{self.num_query_groups} "
            f"(head_dim {self.head_dim}), vocab {self.vocab_size} (padded {self.padded_vocab_size})"
        )
        if self.is_moe:
            text += (
                f", {self.num_experts} experts (top-{self.moe_router_topk}, ffn "
                f"{self.moe_ffn_hidden_size}) in {len(self.moe_layers)} of {self.num_layers} layers"
            )
        return text

    def num_parameters(self, *, active: bool = False) -> int:
        """Parameters of the HF model; ``active``: those one token goes through (the router's
        top-k experts instead of all of them)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        dense_layer = attn + 3 * h * f + 2 * h
        experts = self.moe_router_topk if active else self.num_experts
        moe_layer = attn + experts * 3 * h * self.moe_ffn_hidden_size + self.num_experts * h + 2 * h
        n_moe = len(self.moe_layers)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (L - n_moe) * dense_layer + n_moe * moe_layer + emb + h

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise a clear error when this model cannot be split at (tp, pp, ep)."""
        problems = []
        if self.is_moe:
            if self.num_experts % ep:
                problems.append(f"num_experts={self.num_experts} (over EP={ep})")
            if self.moe_ffn_hidden_size % tp:
                problems.append(f"moe_intermediate_size={self.moe_ffn_hidden_size}")
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups % tp:
            problems.append(f"num_key_value_heads={self.num_query_groups}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size}")
        if self.padded_vocab_size % tp:
            problems.append(f"padded_vocab_size={self.padded_vocab_size}")
        if problems:
            raise ArchError(
                f"{self.hf_architecture} cannot be split over TP={tp}: "
                f"{', '.join(problems)} not divisible by {tp}"
            )
        if self.num_layers % pp:
            raise ArchError(
                f"{self.hf_architecture} has {self.num_layers} layers, not divisible by PP={pp}"
            )


def _parse_moe(cfg: dict[str, Any], hf_arch: str, experts: int) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config; unsupported variants are refused by field name."""
    if experts < 1:
        raise ArchError(f"config.json of a {hf_arch} has no 'num_experts'")
    for key, neutral in _UNSUPPORTED_MOE.items():
        if cfg.get(key) not in (None, neutral):
            raise ArchError(f"{key}={cfg[key]!r} is not supported (routed experts only)")
    topk = int(cfg.get("num_experts_per_tok") or 0)
    if not 1 <= topk <= experts:
        raise ArchError(f"num_experts_per_tok={topk} must be in [1, num_experts={experts}]")
    ffn = cfg.get("moe_intermediate_size")
    if not ffn:
        raise ArchError(f"config.json of a {hf_arch} has no 'moe_intermediate_size'")
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    layers = int(cfg["num_hidden_layers"])
    # transformers' Qwen3MoeDecoderLayer: routed experts where (i + 1) % step == 0, except
    # mlp_only_layers
    moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=int(ffn),
        moe_router_topk=topk,
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers,
    )


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    params = cfg.get("rope_parameters")  # transformers 5.x
    scaling = cfg.get("rope_scaling")  # transformers 4.x
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ArchError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
    try:
        norm = {
            k: float(scaling[k])
            for k in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
        }
    except KeyError as e:
        raise ArchError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    return theta, norm


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict[str, float]) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling, with all four parameters honoured
    (megatron-core's built-in version fixes three of them). Same formula as transformers'
    ``_compute_llama3_parameters``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
