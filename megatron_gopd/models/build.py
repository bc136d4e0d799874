"""Megatron-Core GPT models for the three roles: student, teacher(s) and reference.

Every role has its own :class:`~megatron_gopd.models.arch.ModelArch` and checkpoint; all of them are
built in one job on the same TP/PP process groups (a teacher larger than the student is the normal
case). Frozen roles (teachers, reference) carry no gradients and no optimizer state, run in eval
mode, and can keep their weights in host memory between uses (``offload=True``). Reading and
writing checkpoints is :mod:`megatron_gopd.models.checkpoint`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from megatron_gopd import platform
from megatron_gopd.flags import flag
from megatron_gopd.models.arch import ModelArch, llama3_inv_freq
from megatron_gopd.models.checkpoint import (
    load_model_weights,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from megatron_gopd.utils import GopdError, get_logger

__all__ = [
    "LocalRMSNorm",
    "OffloadStats",
    "RecomputeConfig",
    "RoleModel",
    "build_gpt",
    "build_role",
    "check_vocab_compatible",
    "final_hidden_states",
    "output_rows",
    "output_weight",
    "transformer_config",
    "unwrap_model",
    "use_transformer_engine",
]

log = get_logger(__name__)


# ---------------------------------------------------------------------------------- building


def _have_te() -> bool:
    try:
        from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE
    except ImportError:  # pragma: no cover - very old megatron
        return False
    return bool(HAVE_TE)


def use_transformer_engine(spec: str = "auto") -> bool:
    """``auto``: Transformer Engine when it is installed and CUDA is present; else the local spec."""
    if spec == "local":
        return False
    if spec == "te":
        if not (_have_te() and platform.cuda_available()):
            raise GopdError("--transformer-impl te needs Transformer Engine and a CUDA device")
        return True
    if spec != "auto":
        raise GopdError(f"unknown layer spec {spec!r} (auto, local, te)")
    return _have_te() and platform.cuda_available()


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation of the trained model (megatron-core's; Megatron-LM's flag names).

    Long packed micro-batches keep every layer's activations for the backward pass; recomputing
    them trades ~1/3 more compute for memory. ``selective`` recomputes the core attention only (no
    effect with Transformer Engine's fused attention, which keeps no scores); ``full`` recomputes
    whole layers: ``uniform`` in chunks of ``--recompute-num-layers``, ``block`` the first
    ``--recompute-num-layers`` layers of each pipeline stage. Frozen roles never store activations
    (forward only), so this applies to the student."""

    FLAG_GROUP = "models"

    recompute_granularity: Literal["full", "selective"] | None = flag(
        None,
        help="recompute activations in the backward pass (full layers or selective)",
        default_help="off",
    )
    recompute_method: Literal["uniform", "block"] | None = flag(
        None, help="with full: uniform (chunks of N layers) or block (the first N of each stage)"
    )
    recompute_num_layers: int | None = flag(
        None, help="N of --recompute-method (layers per chunk, or layers per stage)"
    )

    def overrides(self, arch: ModelArch, pp: int) -> dict[str, Any]:
        """TransformerConfig fields; a combination megatron-core would reject (or, on 0.16,
        fail on mid-run) is a :class:`GopdError` naming the flags."""
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g is None:
            if m is not None or n is not None:
                raise GopdError(
                    "--recompute-method / --recompute-num-layers need --recompute-granularity"
                )
            return {}
        if g == "selective":
            if m is not None or n is not None:
                raise GopdError(
                    "--recompute-granularity selective takes no --recompute-method / "
                    "--recompute-num-layers"
                )
            return dict(recompute_granularity="selective")
        per_stage = arch.num_layers // pp
        if m is None or n is None:
            raise GopdError(
                "--recompute-granularity full needs --recompute-method (uniform or block) and "
                "--recompute-num-layers"
            )
        if not 1 <= n <= per_stage:
            raise GopdError(
                f"--recompute-num-layers {n} must be between 1 and the {per_stage} layers per "
                f"pipeline stage"
            )
        if m == "uniform" and per_stage % n:
            # megatron-core 0.16 indexes past the stage's last layer otherwise
            raise GopdError(
                f"--recompute-method uniform needs --recompute-num-layers {n} to divide the "
                f"{per_stage} layers per pipeline stage"
            )
        return dict(recompute_granularity="full", recompute_method=m, recompute_num_layers=n)


def transformer_config(arch: ModelArch, params_dtype: torch.dtype, **overrides):
    """megatron-core TransformerConfig for ``arch`` under the current model-parallel layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size() if arch.is_moe else 1
    arch.check_parallel(tp, pp, ep)
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=not platform.cuda_available(),
        # Per-token loss: the loss function returns (sum, num_tokens) and Megatron divides the
        # gradients by the global token count, so the token-mean does not depend on the split.
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
    )
    if pp > 1:
        # micro-batches of different lengths (packed sequences) through the pipeline: the stages
        # exchange each one's shape first; megatron-core allows that with the all-to-all token
        # dispatcher only, even for a dense model
        kw.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    if arch.is_moe:
        kw.update(_moe_config(arch, ep))
    kw.update(platform.transformer_config_overrides())
    kw.update(overrides)
    return TransformerConfig(**kw)


def _moe_config(arch: ModelArch, ep: int) -> dict[str, Any]:
    """megatron-core's MoE fields for a Qwen3-MoE ``arch`` (frozen roles: no auxiliary loss).

    The router: HF takes the softmax over all experts, keeps the top k and, with
    ``norm_topk_prob``, divides them by their sum; that equals megatron's top-k of the logits
    followed by a softmax over those k (``moe_router_pre_softmax=False``). Without
    ``norm_topk_prob`` the weights are the top k of the full softmax (``pre_softmax=True``).
    ``moe_layer_freq`` is the explicit per-layer pattern (an integer N would mean layers 0, N, 2N,
    not HF's ``(i + 1) % decoder_sparse_step``). Tokens travel between expert-parallel ranks with
    all-to-all (dropless, no capacity factor)."""
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_layer_freq=[int(i in arch.moe_layers) for i in range(arch.num_layers)],
        expert_model_parallel_size=ep,
    )


class LocalRMSNorm:
    """The local spec's RMSNorm: ``torch.nn.RMSNorm``, as megatron-core's ``WrappedTorchNorm``
    builds it, that also runs under sequence parallelism (``WrappedTorchNorm`` refuses it).

    Under sequence parallelism each TP rank normalises its slice of the sequence with the same,
    replicated weight, so the weight's gradient must be summed over the TP group: the weight is
    tagged ``sequence_parallel``, which megatron-core's ``finalize_model_grads`` reduces (TENorm
    and apex's norms carry the same tag).
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise GopdError("the local layer spec supports RMSNorm only (no zero-centred gamma)")
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def _local_layer(arch: ModelArch, moe: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megatron_gopd.models.packed_attention import PackedDotProductAttention

    kw = dict(num_experts=arch.num_experts, moe_grouped_gemm=False) if moe else {}
    layer = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm", **kw)
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = LocalRMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = PackedDotProductAttention  # packed (THD) micro-batches on CPU too
    if arch.qk_norm:
        attn.q_layernorm = attn.k_layernorm = LocalRMSNorm
    if moe:
        # The local spec stores a dense layer's pre-MLP norm under Transformer Engine's fused name
        # (mlp.linear_fc1.layer_norm_weight); an MoE layer has no fused linear_fc1 in TE's spec,
        # which keeps pre_mlp_layernorm.weight: so must we, or our checkpoints would not load there.
        keys = dict(sub.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.", None)
        sub.sharded_state_dict_keys_map = keys
    return layer


def layer_spec(arch: ModelArch, use_te: bool, config):
    """The decoder's spec for this pipeline stage: Transformer Engine's layers, or megatron-core's
    local ones with :class:`LocalRMSNorm` for every norm (the final one included); MoE layers
    where ``arch.moe_layers`` says."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if use_te:
        if arch.is_moe:
            return specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True)
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    first = get_transformer_layer_offset(config)
    n = get_num_layers_to_build(config)
    dense = _local_layer(arch, moe=False)
    moe = _local_layer(arch, moe=True) if arch.is_moe else None
    layers = [moe if i in arch.moe_layers else dense for i in range(first, first + n)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LocalRMSNorm)


def build_gpt(
    arch: ModelArch,
    *,
    params_dtype: torch.dtype = torch.float32,
    spec: str = "auto",
    seed: int | None = None,
    initialize_weights: bool = True,
    **config_overrides,
):
    """One GPTModel chunk for this pipeline stage, on the current device.

    ``initialize_weights=False`` skips the random init (weights will be loaded right after), which
    saves minutes for billion-parameter models on the host.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    platform.setup()
    if seed is not None:
        torch.manual_seed(seed)
    config = transformer_config(
        arch, params_dtype, perform_initialization=initialize_weights, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_transformer_engine(spec), config),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta)
        if float(arch.rope_theta).is_integer()
        else arch.rope_theta,
    )
    if params_dtype != torch.float32:
        # The local spec's torch norms ignore params_dtype; Megatron-LM's Float16Module casts the
        # whole module, and so do we (RoPE frequencies are a plain attribute and stay fp32).
        model.to(params_dtype)
    if arch.rope_scaling is not None:
        # Set all four Llama-3 parameters ourselves; megatron's rope_scaling fixes three of them.
        rope = model.rotary_pos_emb
        rope.inv_freq = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling).to(
            rope.inv_freq.device
        )
    if platform.cuda_available():
        model.cuda(torch.cuda.current_device())
    return model


# ---------------------------------------------------------------------------------- roles


@dataclass
class OffloadStats:
    """What ``--offload-frozen`` moved for a role: device loads and host offloads (phases), bytes
    each way, and how many host buffers were ever allocated (once per tensor)."""

    to_device: int = 0
    to_host: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    host_allocations: int = 0


@dataclass
class RoleModel:
    """A model role in the job: its name, architecture, the stage's model chunk(s) and state."""

    name: str
    arch: ModelArch
    chunks: list  # [GPTModel] (one chunk per virtual pipeline stage; we build one)
    frozen: bool
    checkpoint: str | None = None
    offload: bool = False
    offload_stats: OffloadStats = field(default_factory=OffloadStats, repr=False)
    _on_device: bool = field(default=True, repr=False)
    _host: list[torch.Tensor] | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)

    @property
    def model(self):
        return self.chunks[0]

    @property
    def lockstep_group(self):
        """The process group whose ranks must run this role's forward passes together, however
        many sequences each has: the expert-parallel group of an MoE model at EP > 1 (its MoE
        layers exchange tokens with all-to-alls over it). None for dense models."""
        if not self.arch.is_moe:
            return None
        from megatron.core import parallel_state as ps

        if ps.get_expert_model_parallel_world_size() == 1:
            return None
        return ps.get_expert_model_parallel_group()

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths fed to this role must be a multiple of this (TP under sequence
        parallelism, which splits the sequence over the tensor-parallel ranks; else 1)."""
        cfg = self.model.config
        return cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1

    def freeze(self) -> None:
        for m in self.chunks:
            m.eval()
            m.requires_grad_(False)
        self.frozen = True

    def _tensors(self) -> list[torch.Tensor]:
        return [t for m in self.chunks for t in _tensors(m)]

    def offload_to_host(self) -> None:
        """Leave the device: the weights live in host memory (pinned with CUDA) until the next
        :meth:`load_to_device`.

        The host buffers are allocated and filled once, at the first offload, and reused by every
        later one. A frozen role's weights never change, so from then on the host copy is
        current and leaving the device is only dropping the device copy: no transfer back, no
        allocation. On a machine without CUDA the same steps run with host "devices" (the moves
        cost nothing; the counters in :attr:`offload_stats` are the same as on a GPU)."""
        if not self._on_device:
            return
        if not self.frozen:
            raise RuntimeError(f"role {self.name} is trained: only frozen roles are offloaded")
        tensors = self._tensors()
        st = self.offload_stats
        if self._host is None:
            pin = platform.cuda_available()
            self._host = [torch.empty_like(t.data, device="cpu", pin_memory=pin) for t in tensors]
            for h, t in zip(self._host, tensors, strict=True):
                h.copy_(t.data, non_blocking=pin)
            if pin:
                torch.cuda.synchronize()
            st.host_allocations += len(tensors)
            st.bytes_to_host += sum(t.numel() * t.element_size() for t in tensors)
        for h, t in zip(self._host, tensors, strict=True):
            t.data = h
        st.to_host += 1
        self._on_device = False

    def load_to_device(self) -> None:
        if self._on_device:
            return
        dev = platform.device()
        for h, t in zip(self._host, self._tensors(), strict=True):
            t.data = h.to(dev, non_blocking=True)
        st = self.offload_stats
        st.to_device += 1
        st.bytes_to_device += sum(h.numel() * h.element_size() for h in self._host)
        self._on_device = True

    @contextlib.contextmanager
    def in_use(self):
        """Weights on the device for the duration of the block; back on the host after the
        outermost such block when ``offload`` is set (frozen roles between phases). Blocks nest:
        a phase holds the role once (e.g. the whole update, with every micro-batch's teacher
        forward inside), so the weights cross the bus once per phase, not per micro-batch."""
        self.load_to_device()
        self._users += 1
        try:
            yield self
        finally:
            self._users -= 1
            if self.offload and self._users == 0:
                self.offload_to_host()


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from (b for b in module.buffers() if b is not None)


def build_role(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    arch: ModelArch | None = None,
    frozen: bool,
    params_dtype: torch.dtype = torch.float32,
    offload: bool = False,
    spec: str = "auto",
    seed: int = 1234,
    sequence_parallel: bool = False,
    recompute: RecomputeConfig | None = None,
) -> RoleModel:
    """Build a role from a checkpoint (architecture read from it) or from ``arch`` (random init).

    ``sequence_parallel``: Megatron's sequence parallelism over the tensor-parallel group (the
    activations between layers are split along the sequence, whose length must then be a multiple
    of TP: :attr:`RoleModel.sequence_multiple`). ``recompute``: activation recomputation (trained
    roles)."""
    ckpt_dir = None
    if checkpoint is not None:
        ckpt_dir = resolve_checkpoint(checkpoint)
        arch = read_checkpoint_meta(ckpt_dir).arch
    if arch is None:
        raise GopdError(f"role {name!r}: give a checkpoint or an architecture")
    extra = {}
    if recompute is not None and not frozen:
        from megatron.core import parallel_state as ps

        extra = recompute.overrides(arch, ps.get_pipeline_model_parallel_world_size())
    model = build_gpt(
        arch,
        params_dtype=params_dtype,
        spec=spec,
        seed=seed,
        initialize_weights=ckpt_dir is None,
        sequence_parallel=sequence_parallel,
        **extra,
    )
    if ckpt_dir is not None:
        load_model_weights(model, ckpt_dir)
    role = RoleModel(
        name=name,
        arch=arch,
        chunks=[model],
        frozen=False,
        checkpoint=str(ckpt_dir) if ckpt_dir else None,
        offload=offload,
    )
    if frozen:
        role.freeze()
        if offload:
            role.offload_to_host()
    return role


def check_vocab_compatible(student: ModelArch, other: ModelArch, other_name: str) -> None:
    """Teacher/reference and student must index the same tokens.

    Padding differences are fine: HF rows beyond the tokenizer (e.g. Qwen's 151936 vs 152064) and
    Megatron's padded rows are never sampled and our log-probs mask Megatron's padding. What is not
    fine is a different tokenizer, which shows as a different number of real tokens.

    The token counts come from the tokenizers recorded at conversion. When one side has none, its
    token count is unknown: HF rows are padded by amounts nobody records, so rows that merely cover
    the other side's tokens prove nothing (a 250-row model and a 15-token student). Then only equal
    embedding rows are accepted, and the error says how to record the tokenizer.
    """
    s, o = student.token_vocab_size, other.token_vocab_size
    if student.tokenizer_vocab_size and other.tokenizer_vocab_size:
        same = s == o
    else:
        same = student.vocab_size == other.vocab_size
    if not same:
        without = [
            name
            for name, arch in ((other_name, other), ("student", student))
            if not arch.tokenizer_vocab_size
        ]
        hint = (
            f"; the {' and the '.join(without)} checkpoint has no tokenizer, so its token count "
            f"is unknown: convert it from a directory with its tokenizer files"
            if without
            else ""
        )
        raise GopdError(
            f"the {other_name} and the student do not share a tokenizer: {other_name} vocabulary "
            f"has {o} tokens, the student's has {s} (embedding rows: {other.vocab_size} vs "
            f"{student.vocab_size}); they cannot score the same token ids{hint}"
        )


def unwrap_model(model):
    """The GPTModel inside megatron-core's wrappers (DDP, Float16Module): ``.module`` until none."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ---------------------------------------------------------------------------------- output layer


@contextlib.contextmanager
def final_hidden_states(model):
    """Make the GPTModel (inside any wrapper) return its final, normed hidden states ``[S, B, H]``
    (``[S / TP, B, H]`` under sequence parallelism) instead of logits: the output layer then runs
    in fp32, chunk by chunk (:mod:`megatron_gopd.vocab_parallel.output_layer`)."""
    gpt = unwrap_model(model)
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def output_weight(model) -> torch.Tensor:
    """This TP rank's ``[V_padded / TP, H]`` output weight (the embedding's when tied)."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def output_rows(model, hidden: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """Final hidden states ``[S(/TP), B, H]`` -> ``[B * S, H]``, one row per token in ``(b, s)``
    order, as this rank's slice of the output layer reads them (what megatron-core's
    ``ColumnParallelLinear`` does to its input).

    Under sequence parallelism the sequence is gathered from the TP ranks. With ``grad`` the
    gradient flowing back is summed over the TP group (each rank's is its vocabulary slice's
    share): a reduce-scatter under sequence parallelism, else an all-reduce."""
    from megatron.core import tensor_parallel

    config = unwrap_model(model).config
    if config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=grad
        )
    rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
    if grad and not config.sequence_parallel and config.tensor_model_parallel_size > 1:
        # after the reshape, not before: megatron-core's all-reduce in this region's backward
        # reduces ``grad.contiguous()`` and returns ``grad``, so a non-contiguous gradient (that of
        # the transposed [S, B, H] states) would silently stay unreduced
        rows = tensor_parallel.copy_to_tensor_model_parallel_region(rows)
    return rows
