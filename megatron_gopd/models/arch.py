"""Model architecture: one typed description, derived from a Hugging Face ``config.json``.

A :class:`ModelArch` is everything needed to build the Megatron-Core ``GPTModel`` of a role and to
map its weights to and from Hugging Face names. Converted checkpoints store it (``gopd_model.json``),
so loading needs no repeated model flags.

Supported: dense Llama (incl. Llama-3 rope scaling), Qwen2 and Qwen3 decoder-only models: GQA,
SwiGLU, RMSNorm, RoPE, Qwen2 q/k/v bias, Qwen3 q/k RMSNorm and explicit ``head_dim``, tied or
untied embeddings. Anything else is refused with a message that names the unsupported field.

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
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

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
        if cfg.get("num_experts") or cfg.get("num_local_experts"):
            raise ArchError("mixture-of-experts models are not supported (dense models only)")

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
            qk_norm=family == "qwen3",
            torch_dtype=str(dtype),
            rope_scaling=rope_scaling,
            tokenizer_vocab_size=tokenizer_vocab_size,
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
        return cls(**d)

    # ------------------------------------------------------------------ derived

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.torch_dtype)

    @property
    def token_vocab_size(self) -> int:
        """How many token ids the tokenizer can produce (for the vocabulary check)."""
        return self.tokenizer_vocab_size or self.vocab_size

    def describe(self) -> str:
        return (
            f"{self.hf_architecture}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"ffn {self.ffn_hidden_size}, heads {self.num_attention_heads}/{self.num_query_groups} "
            f"(head_dim {self.head_dim}), vocab {self.vocab_size} (padded {self.padded_vocab_size})"
        )

    def num_parameters(self) -> int:
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * layer + emb + h

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise a clear error when this model cannot be split at (tp, pp)."""
        problems = []
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
