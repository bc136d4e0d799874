"""The checks that need files but no model, run on every rank before anything is built.

:func:`build_config` has checked the flags; here the checkpoints are read (they exist, and every
teacher and reference shares the student's vocabulary), the prompt data is tokenized (each problem
names its file and line), and the domain routing is resolved for the domains the data holds. All of
it is cheap and identical on every rank, so every rank raises the same one-line error and none is
left waiting in a collective.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_gopd import parallel
from megatron_gopd.models.build import check_vocab_compatible
from megatron_gopd.models.checkpoint import read_checkpoint_meta, resolve_checkpoint
from megatron_gopd.trainer.data import DEFAULT_DOMAIN, Prompt, load_prompts
from megatron_gopd.trainer.routing import DomainRouting
from megatron_gopd.utils import GopdError, check_writable, get_logger

__all__ = ["Inputs", "check_memory", "describe_domains", "load_tokenizer", "validate_inputs"]

log = get_logger(__name__)


@dataclass
class Inputs:
    """What the preflight read: the prompts, the evaluation prompts, and the routing of their
    domains."""

    prompts: list[Prompt]
    eval_prompts: list[Prompt] | None
    routing: DomainRouting


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    path = cfg.data.tokenizer
    if path is None:
        path = str(resolve_checkpoint(cfg.models.student_load) / "tokenizer")
        if not Path(path).is_dir():
            raise GopdError(
                f"the student checkpoint {cfg.models.student_load} has no tokenizer/: "
                f"give --tokenizer"
            )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise GopdError(f"cannot load the tokenizer from {path}: {e}") from None


def validate_inputs(cfg, tokenizer) -> Inputs:
    """The outputs can be written, checkpoints exist and share the student's vocabulary, a
    reference exists where lambda != 1, the prompt data parses, and the estimator fits the
    layout."""
    for flag, path in (
        ("--save", cfg.checkpoint.save),
        ("--tensorboard-dir", cfg.log.tensorboard_dir),
        ("--wandb-save-dir", cfg.log.wandb_save_dir),
    ):
        if path:
            check_writable(path, flag, directory=True)
    student = read_checkpoint_meta(resolve_checkpoint(cfg.models.student_load)).arch
    cfg.recompute.overrides(student, cfg.parallel.pp)  # the recompute flags fit the student
    if student.is_moe:
        raise GopdError(
            f"the student {cfg.models.student_load} is a mixture-of-experts model "
            f"({student.hf_architecture}): MoE students are not supported (teachers and "
            f"references may be MoE)"
        )
    teachers = cfg.routing.teachers
    for key, path in teachers.items():
        arch = read_checkpoint_meta(resolve_checkpoint(path)).arch
        name = f"teacher ({key})" if key != DEFAULT_DOMAIN else "teacher"
        check_vocab_compatible(student, arch, name)
        _check_logits_comparable(cfg, student, arch, name)

    skipped: dict[str, int] = {}

    def load(path, training):
        return load_prompts(
            path,
            tokenizer,
            apply_chat_template=cfg.data.apply_chat_template,
            known_domains=cfg.routing.teacher_domains,
            max_prompt_len=cfg.data.max_prompt_len,
            chat_template_kwargs=cfg.data.chat_template_kwargs,
            keep_domains=cfg.data.domains,
            require_kept_domains=training,
            skipped=skipped if training else None,
        )

    prompts = load(cfg.data.prompt_data, True)
    eval_prompts = load(cfg.data.eval_prompt_data, False) if cfg.data.eval_prompt_data else None
    routing = cfg.routing.resolve(p.domain for p in [*prompts, *(eval_prompts or [])])
    for d in routing.domains:
        key = routing[d].reference
        if key is not None and not routing[d].reference_served:
            arch = read_checkpoint_meta(resolve_checkpoint(cfg.routing.references[key])).arch
            check_vocab_compatible(student, arch, f"reference ({d})")
            _check_logits_comparable(cfg, student, arch, f"reference ({d})")
    if cfg.loss.estimator != "sampled" and cfg.parallel.ep > 1:
        raise GopdError(
            f"--gopd-estimator {cfg.loss.estimator} runs the frozen roles per micro-batch of the "
            f"student, which expert parallelism cannot keep in step: use the sampled estimator "
            f"with --expert-model-parallel-size {cfg.parallel.ep}"
        )
    if parallel.is_rank0():
        for line in describe_domains(cfg, routing, prompts, eval_prompts, skipped):
            log.info("%s", line)
    if cfg.loss.estimator != "sampled" and cfg.parallel.pp > 1:
        raise GopdError(
            f"--gopd-estimator {cfg.loss.estimator} needs the frozen roles' logits at the "
            f"student's last stage: use --pipeline-model-parallel-size 1"
        )
    return Inputs(prompts, eval_prompts, routing)


def check_memory(cfg, routing: DomainRouting, world_size: int) -> None:
    """Print each role's estimated per-GPU memory for this layout (rank 0) and refuse a layout
    that cannot fit ``--gpu-memory-gb`` (default: the device's memory; no check on a CPU)."""
    from megatron_gopd import parallel, platform
    from megatron_gopd.models import memory

    par = cfg.parallel
    lay = memory.Layout(
        tp=par.tp,
        pp=par.pp,
        ep=par.ep,
        dp=max(world_size // (par.tp * par.pp), 1),
        sequence_parallel=par.sequence_parallel,
    )
    # one micro-batch: the packing budget, or rows of the longest sequences the run allows
    tokens = (
        cfg.max_tokens_per_microbatch
        if cfg.packing
        else cfg.micro_batch_size * (cfg.data.max_prompt_len + cfg.rollout.max_response_len)
    )
    common = dict(bf16=cfg.models.bf16, tokens=tokens)

    def estimate(name, path, trainable):
        ckpt = resolve_checkpoint(path)
        return memory.estimate_role(
            name,
            read_checkpoint_meta(ckpt).arch,
            lay,
            trainable=trainable,
            distributed_optimizer=cfg.optim.use_distributed_optimizer,
            source=str(ckpt.resolve()),
            **common,
        )

    student = estimate("student", cfg.models.student_load, True)
    frozen = [
        estimate(f"teacher:{k}", cfg.routing.teachers[k], False) for k in routing.teacher_keys
    ]
    frozen += [
        estimate(f"reference:{k}", cfg.routing.references[k], False) for k in routing.reference_keys
    ]
    if parallel.is_rank0():
        log.info(
            "estimated memory per GPU (TP=%d PP=%d EP=%d DP=%d, micro-batch of %d tokens):\n%s",
            lay.tp,
            lay.pp,
            lay.ep,
            lay.dp,
            tokens,
            memory.format_table([student, *frozen]),
        )
        served = [f"teacher:{k}" for k in routing.served_teachers]
        served += [f"reference:{k}" for k in routing.served_references]
        if served:
            log.info(
                "served by SGLang on their own nodes (no trainer memory): %s", ", ".join(served)
            )
    budget = cfg.models.gpu_memory_gb
    if budget is None and platform.cuda_available():
        import torch

        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    if budget is not None:
        memory.check_fits(student, frozen, budget, offload_frozen=cfg.models.offload_frozen)


def describe_domains(cfg, routing, prompts, eval_prompts, skipped: dict[str, int]) -> list[str]:
    """What the run does with each domain, for the start-up log: its prompt counts, teacher,
    lambda and reference, so that mixed data routed to one teacher is said, not silent."""
    train = Counter(p.domain for p in prompts)
    evals = Counter(p.domain for p in eval_prompts or [])
    domains = routing.domains
    head = f"{len(domains)} domain{'s' if len(domains) != 1 else ''} ({', '.join(domains)})"
    if (
        set(routing.teacher_keys) | set(routing.served_teachers) == {DEFAULT_DOMAIN}
        and len(domains) > 1
    ):
        head += (
            "; one teacher (--teacher-load PATH) scores all of them: name one per domain with "
            "--teacher-load DOMAIN=PATH, or keep some with --domains"
        )
    lines = [head]
    for d in domains:
        route = routing[d]
        ref = route.reference
        counts = f"{train[d]} training" + (f" / {evals[d]} evaluation" if eval_prompts else "")
        lines.append(
            f"  {d}: {counts} prompts -> teacher {cfg.routing.teacher_name(route.teacher)}, "
            f"lambda {route.lam:g}, "
            + (f"reference {cfg.routing.reference_name(ref)}" if ref else "no reference")
        )
    if skipped:
        dropped = ", ".join(f"{d} ({n})" for d, n in sorted(skipped.items()))
        lines.append(f"  --domains {','.join(cfg.data.domains)}: skipped the prompts of {dropped}")
    return lines


def _check_logits_comparable(cfg, student, other, name: str) -> None:
    """The full-vocabulary and top-k estimators read the teacher's and reference's logits next to
    the student's, column by column on each tensor-parallel rank's vocabulary slice: the three
    must be padded to one size (the same slices), and a frozen role must have a row for every
    token the student can produce (it may have more: its softmax runs over its own rows)."""
    est = cfg.loss.estimator
    if est == "sampled":
        return
    if other.padded_vocab_size != student.padded_vocab_size:
        raise GopdError(
            f"--gopd-estimator {est} reads the {name}'s logits next to the student's on the same "
            f"vocabulary slice of every tensor-parallel rank, but the {name}'s vocabulary is "
            f"padded to {other.padded_vocab_size} rows and the student's to "
            f"{student.padded_vocab_size}: convert both with the same "
            "--make-vocab-size-divisible-by (the default, 1024, pads e.g. 151936 and 152064 "
            "rows alike), or use --gopd-estimator sampled"
        )
    if other.vocab_size < student.vocab_size:
        raise GopdError(
            f"--gopd-estimator {est}: the {name} has {other.vocab_size} vocabulary rows, fewer "
            f"than the student's {student.vocab_size}, so it gives no probability to tokens the "
            "student can produce and the full-vocabulary KL is infinite; use --gopd-estimator "
            "sampled"
        )
