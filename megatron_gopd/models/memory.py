"""Per-GPU memory of each role under a layout, estimated from the architectures alone.

The trainer prints this before any model is built and refuses a layout that cannot fit
``--gpu-memory-gb``, naming the role and the numbers (an out-of-memory error an hour into a
multi-node job, after conversion, launch and the first rollout, is the alternative).

Per GPU, for the busiest pipeline stage (its share of the layers, plus the embedding on the first
stage and the output layer on the last; with PP > 1 a tied output layer is a second copy):

    weights      parameters / TP (expert weights / (TP x EP); norms and routers replicated)
                 x 2 bytes in bf16, 4 in fp32
    grads        trainable roles only: megatron DDP's fp32 gradient buffer, 4 bytes / parameter
    optimizer    trainable roles only: Adam's two fp32 moments (8 bytes / parameter) and, for a
                 bf16 model, the fp32 main parameters (4 more), divided by DP with
                 --use-distributed-optimizer
    activations  one micro-batch of ``tokens``: training keeps every layer's inputs for the
                 backward pass, ~ (4h + q + 2kv + q + 3f) values per token per layer (flash
                 attention: no seq^2 term; SwiGLU's three f-wide tensors; an MoE layer's tokens
                 visit k experts: f = k x moe_ffn), split over TP (the h-wide ones only under
                 sequence parallelism); a forward-only role keeps one layer's working set at a
                 time. Both add the output layer's one fp32 chunk of logits
                 (``chunk_elements`` values); training also its fp32 weight gradient.

These are estimates: the CUDA context, NCCL buffers and the allocator's fragmentation come on top
(budget a few GB), and recomputation or packing change the activation term. The phases decide what
is resident together: during the update, the student with all its state plus the frozen roles'
weights (none with --offload-frozen); while a frozen role scores, the student's weights, grads and
optimizer state, the frozen weights, and that role's forward activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_gopd.models.arch import ModelArch
from megatron_gopd.utils import GopdError

__all__ = ["Layout", "RoleMemory", "check_fits", "estimate_role", "format_table", "peak_phase"]

GB = 1e9


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class RoleMemory:
    """Bytes per GPU."""

    role: str
    arch: ModelArch
    weights: int
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    source: str = ""  # the checkpoint: roles that share one share a model

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def state(self) -> int:
        """What stays on the device between phases (all but the activations)."""
        return self.weights + self.grads + self.optimizer


def _stage_parameters(arch: ModelArch, lay: Layout) -> float:
    """Parameters one GPU of the busiest pipeline stage holds."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attn = (h * (q + 2 * kv) + q * h + (q + 2 * kv if arch.qkv_bias else 0)) / lay.tp
    norms = 2 * h + (2 * d if arch.qk_norm else 0)
    dense = attn + 3 * h * arch.ffn_hidden_size / lay.tp + norms
    moe = (
        attn
        + arch.num_experts * 3 * h * arch.moe_ffn_hidden_size / (lay.tp * lay.ep)
        + arch.num_experts * h  # the router, replicated
        + norms
    )
    per_stage = arch.num_layers // lay.pp
    layers = [moe if i in arch.moe_layers else dense for i in range(arch.num_layers)]
    stages = [sum(layers[s * per_stage : (s + 1) * per_stage]) for s in range(lay.pp)]
    emb = arch.padded_vocab_size * h / lay.tp
    out = 0.0 if arch.tie_word_embeddings and lay.pp == 1 else emb
    stages[0] += emb
    stages[-1] += out + h  # output layer and final norm
    return max(stages)


def _activations(arch: ModelArch, lay: Layout, tokens: int, value_bytes: int, train: bool):
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    f = arch.ffn_hidden_size
    if arch.is_moe:
        f = max(f, arch.moe_router_topk * arch.moe_ffn_hidden_size)
    hidden_split = lay.tp if lay.sequence_parallel else 1
    per_token = 4 * h / hidden_split + (2 * q + 2 * kv + 3 * f) / lay.tp
    layers = arch.num_layers // lay.pp if train else 1
    return tokens * per_token * layers * value_bytes


def estimate_role(
    role: str,
    arch: ModelArch,
    lay: Layout,
    *,
    bf16: bool,
    trainable: bool,
    tokens: int,
    distributed_optimizer: bool = False,
    chunk_elements: int = 1 << 26,
    source: str = "",
) -> RoleMemory:
    """The per-GPU memory of ``role`` (see the module docstring for each term)."""
    nbytes = 2 if bf16 else 4
    params = _stage_parameters(arch, lay)
    weights = params * nbytes
    grads = optimizer = 0.0
    act = _activations(arch, lay, tokens, nbytes, train=trainable)
    # the output layer works in fp32 chunks of logits (vocab_parallel.output_layer)
    act += min(chunk_elements, tokens * arch.padded_vocab_size / lay.tp) * 4
    if trainable:
        grads = params * 4
        optimizer = params * (12 if bf16 else 8) / (lay.dp if distributed_optimizer else 1)
        act += arch.padded_vocab_size / lay.tp * arch.hidden_size * 4  # its fp32 weight gradient
    return RoleMemory(role, arch, int(weights), int(grads), int(optimizer), int(act), source)


def peak_phase(student: RoleMemory, frozen: list[RoleMemory], *, offload_frozen: bool):
    """``(bytes, phase)`` of the phase with the most resident memory."""
    resident = 0 if offload_frozen else sum(r.weights for r in _unique(frozen))
    phases = [(student.total + resident, "update (student)")]
    for r in frozen:
        held = resident if not offload_frozen else r.weights
        phases.append((student.state + held + r.activations, f"scoring ({r.role})"))
    return max(phases, key=lambda p: p[0])


def _unique(frozen: list[RoleMemory]) -> list[RoleMemory]:
    """A checkpoint used by several roles is one model."""
    seen, out = set(), []
    for r in frozen:
        key = r.source or r.role
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3g}"


def format_table(roles: list[RoleMemory]) -> str:
    rows = [
        f"  {'role':<22} {'params':>8} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'activ.':>8} {'total':>8}  (GB per GPU)"
    ]
    for r in roles:
        rows.append(
            f"  {r.role:<22} {r.arch.num_parameters() / 1e9:>7.2f}B {r.weights / GB:>8.2f} "
            f"{r.grads / GB:>8.2f} {r.optimizer / GB:>8.2f} {r.activations / GB:>8.2f} "
            f"{r.total / GB:>8.2f}"
        )
    return "\n".join(rows)


def check_fits(
    student: RoleMemory, frozen: list[RoleMemory], budget_gb: float, *, offload_frozen: bool
) -> None:
    """Raise a :class:`GopdError` naming the phase, the roles and the numbers when the peak phase
    exceeds ``budget_gb`` per GPU."""
    peak, phase = peak_phase(student, frozen, offload_frozen=offload_frozen)
    if peak <= budget_gb * GB:
        return
    parts = [
        f"{r.role} {_gb(r.total)} GB (weights {_gb(r.weights)}, grads {_gb(r.grads)}, "
        f"optimizer {_gb(r.optimizer)}, activations {_gb(r.activations)})"
        for r in [student, *frozen]
    ]
    raise GopdError(
        f"the layout does not fit {budget_gb:g} GB per GPU: the {phase} phase needs about "
        f"{_gb(peak)} GB per GPU ({'; '.join(parts)}"
        f"{'; frozen roles offloaded between uses' if offload_frozen else ''}). Raise "
        f"--tensor-model-parallel-size / --pipeline-model-parallel-size"
        f"{' / --expert-model-parallel-size' if any(r.arch.is_moe for r in frozen) else ''}, "
        f"use --use-distributed-optimizer or --offload-frozen, or shorten the micro-batches"
    )
