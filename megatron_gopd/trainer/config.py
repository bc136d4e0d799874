"""``gopd-train``'s configuration: the components' typed configs composed into one
:class:`TrainConfig`, the command line derived from them, and the checks that span components.

Every setting is defined once, as a field of the config of the component that uses it (see
:mod:`megatron_gopd.flags`)::

    ParallelConfig     megatron_gopd.parallel              --tensor-model-parallel-size, ...
    ModelsConfig       here                                --student-load, --bf16, ...
    Routing            megatron_gopd.trainer.routing       --teacher-load/-urls, --ref-load/-urls, ...
    ServedConfig       megatron_gopd.trainer.served        --served-* (served teachers/references)
    GOPDLossConfig     megatron_gopd.gopd.config           --gopd-estimator, --fdiv-*, ...
    OptimConfig        megatron_gopd.trainer.update        --lr, --adam-beta2, ...
    DataConfig         megatron_gopd.trainer.data          --prompt-data, --max-prompt-len, ...
    RolloutConfig      megatron_gopd.trainer.rollout_side  --rollout-*, --sglang-*, --weight-sync*
    CheckpointConfig   megatron_gopd.trainer.checkpointing --save, --load, ...
    EvalConfig         here                                --eval-interval, ...
    LogConfig          megatron_gopd.trainer.tracking      --log-interval, --wandb-*, ...
    TrainConfig        here                                --train-iters, --micro-batch-size, ...

:func:`build_parser` derives the flags (names, defaults, choices, help) from those fields;
:func:`parse_args` adds YAML config files (keys are the flag names with underscores; the command
line wins, and a list flag on the command line replaces the file's list); :func:`build_config`
builds the composed config and checks what can be checked without touching a file, a model or a
server. :mod:`megatron_gopd.trainer.preflight` then checks the files. Nothing below the driver sees
the argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_gopd.flags import (
    FlagFormatter,
    add_flags,
    config_from_args,
    flag,
    flag_fields,
    flag_name,
)
from megatron_gopd.gopd import GOPDLossConfig, LossConfigError
from megatron_gopd.gopd.config import FDIV_FLAG_GROUP as _FDIV_GROUP
from megatron_gopd.models.build import RecomputeConfig
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.trainer.checkpointing import GROUP as CKPT_GROUP
from megatron_gopd.trainer.checkpointing import CheckpointConfig
from megatron_gopd.trainer.data import DEFAULT_DOMAIN, DataConfig
from megatron_gopd.trainer.rollout_side import RolloutConfig
from megatron_gopd.trainer.routing import Routing
from megatron_gopd.trainer.served import ServedConfig
from megatron_gopd.trainer.tracking import LogConfig
from megatron_gopd.trainer.update import OptimConfig
from megatron_gopd.utils import GopdError, read_text_file

__all__ = [
    "EvalConfig",
    "ModelsConfig",
    "TrainConfig",
    "build_config",
    "build_parser",
    "check_world",
    "parse_args",
]

_BATCHES = ParallelConfig.FLAG_GROUP
_OPTIM = OptimConfig.FLAG_GROUP


@dataclass(frozen=True)
class ModelsConfig:
    """The student and how every role is built (teachers and references: :class:`Routing`)."""

    FLAG_GROUP = "models"

    student_load: str | None = flag(
        None,
        help="student checkpoint (tools/convert_hf_to_megatron.py output)",
        default_help="required",
    )
    offload_frozen: bool = flag(
        False, help="keep teacher/reference weights in host memory between scoring passes"
    )
    bf16: bool = flag(
        False,
        help="bf16 models (fp32 main params in the optimizer; log-probs always from fp32 logits)",
    )
    teacher_temperature: float | None = flag(
        None,
        help="the teachers score log softmax(logits / T) at this T (the student is always scored "
        "at the sampling temperature, which its rollouts come from)",
        default_help="--rollout-temperature",
    )
    ref_temperature: float | None = flag(
        None,
        help="the reference scores log softmax(logits / T) at this T",
        default_help="--rollout-temperature",
    )
    transformer_impl: Literal["auto", "local", "te"] = flag(
        "auto",
        help="layer implementation: Transformer Engine when available (auto), or local",
    )
    gpu_memory_gb: float | None = flag(
        None,
        help="memory per GPU in GB: a layout whose estimated per-GPU memory (printed at start) "
        "exceeds it is refused before any model is built",
        default_help="the device's memory with CUDA; no check without",
    )


@dataclass(frozen=True)
class EvalConfig:
    """The trainer's periodic evaluation on ``--eval-prompt-data``."""

    FLAG_GROUP = CKPT_GROUP

    interval: int = flag(0, name="--eval-interval", help="steps between evaluations (0: never)")
    n_samples: int = flag(1, name="--eval-n-samples", help="responses per evaluation prompt")
    grader: Literal["math", "exact"] = flag(
        "math",
        name="--eval-grader",
        help="how evaluation prompts' 'answer' is checked: math-verify on the last \\boxed{} "
        "(math), or the whole response equal to the answer (exact; both through the tokenizer's "
        "encode + decode, so a tokenizer that decodes with spaces between pieces still matches; "
        "surrounding whitespace ignored)",
    )


@dataclass(frozen=True)
class TrainConfig:
    """The whole job: one config per component, and the run's own schedule."""

    parallel: ParallelConfig
    models: ModelsConfig
    recompute: RecomputeConfig
    routing: Routing
    served: ServedConfig
    loss: GOPDLossConfig
    data: DataConfig
    rollout: RolloutConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    log: LogConfig
    micro_batch_size: int = flag(
        1, group=_BATCHES, help="samples per forward pass (with --no-packing)"
    )
    max_tokens_per_microbatch: int | None = flag(
        None,
        group=_BATCHES,
        help="token budget of a packed micro-batch: whole sequences laid end to end, no padding "
        "between them, for the student update and every frozen role's scoring",
        default_help="--micro-batch-size x (--max-prompt-len + --max-response-len)",
    )
    packing: bool = flag(
        True,
        name="--no-packing",
        invert=True,
        group=_BATCHES,
        help="right-padded micro-batches of --micro-batch-size rows instead of packed ones",
    )
    global_batch_size: int | None = flag(
        None,
        group=_BATCHES,
        help="samples per optimizer step",
        default_help="the whole rollout batch, i.e. one on-policy update per rollout as in the "
        "paper",
    )
    train_iters: int = flag(100, group=_OPTIM, help="training steps (rollout batches)")
    seed: int = flag(
        1234, group=_OPTIM, help="random seed (initialisation, data order, sampling seeds)"
    )

    @property
    def updates_per_step(self) -> int:
        return self.rollout.samples_per_step // self.global_batch_size

    @property
    def run_dir(self) -> Path | None:
        return Path(self.checkpoint.save) if self.checkpoint.save else None


# The order of the sections and flags in --help.
_SECTIONS = (
    ModelsConfig.FLAG_GROUP,
    _BATCHES,
    _OPTIM,
    GOPDLossConfig.FLAG_GROUP,
    _FDIV_GROUP,
    DataConfig.FLAG_GROUP,
    RolloutConfig.FLAG_GROUP,
    CKPT_GROUP,
)
_COMPONENTS = (
    ModelsConfig,
    RecomputeConfig,
    Routing,
    ServedConfig,
    ParallelConfig,
    OptimConfig,
    TrainConfig,
    GOPDLossConfig,
    DataConfig,
    RolloutConfig,
    CheckpointConfig,
    EvalConfig,
    LogConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-train",
        description="Generalized On-Policy Distillation (G-OPD / ExOPD) with Megatron-Core. "
        "One process needs no launcher (gopd-train ...); for more, run under torchrun.",
        formatter_class=FlagFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file of flag defaults (flags override it)")
    groups = {title: p.add_argument_group(title) for title in _SECTIONS}
    for cls in _COMPONENTS:
        add_flags(p, cls, groups=groups)
    return p


def _append_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is None:
        return parser.parse_args(argv)
    import yaml

    try:
        data = yaml.safe_load(read_text_file(first.config, "config")) or {}
    except yaml.YAMLError as e:
        raise GopdError(f"{first.config} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise GopdError(f"{first.config} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GopdError(f"{first.config}: unknown key(s) {', '.join(unknown)}")
    appends = _append_dests(parser)
    for k, v in data.items():
        if k in appends and not isinstance(v, list):
            data[k] = [v]
    # list flags: the command line replaces the file's list, so they stay None until parsed
    parser.set_defaults(**{k: v for k, v in data.items() if k not in appends})
    args = parser.parse_args(argv)
    for k in appends & set(data):
        if getattr(args, k) is None:
            setattr(args, k, [str(x) for x in data[k]])
    return args


def _from_args(cls, args: argparse.Namespace, **fields):
    """``config_from_args``, with a config's own error naming the flag instead of the field."""
    try:
        return config_from_args(cls, args, **fields)
    except LossConfigError as e:
        m = re.match(r"(\w+)=", str(e))
        names = {f.name: flag_name(f, spec) for f, spec, _ in flag_fields(cls)}
        if m and m.group(1) in names:
            raise LossConfigError(f"{names[m.group(1)]}: {e}") from None
        raise


# SGLang samples greedily (top_k = 1) below this temperature (its SamplingParams)
_GREEDY_BELOW = 1e-6


def _check_training_sampling(rollout: RolloutConfig) -> None:
    """Training rollouts must be samples of the student's tempered distribution ``pi_T``, whose
    log-probs the trainer computes over the whole vocabulary: no greedy decoding, no truncation
    (top-p, top-k; SGLang's min-p is never sent). Evaluation (``gopd-eval``) may truncate."""
    T = rollout.temperature
    if not (math.isfinite(T) and T >= _GREEDY_BELOW):
        raise GopdError(
            f"--rollout-temperature {T}: training needs a finite temperature > 0 (SGLang decodes "
            f"greedily below {_GREEDY_BELOW:g}, and greedy responses are not samples of the "
            "student's distribution); the paper samples at 1.0"
        )
    if T != 1.0 and os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in (
        "1",
        "true",
        "yes",
    ):
        raise GopdError(
            f"SGLANG_RETURN_ORIGINAL_LOGPROB is set: the rollout servers started from this "
            f"environment report untempered log-probs, but the samples come from temperature {T} "
            "and the trainer scores them there; unset it"
        )
    truncating = []
    if rollout.top_p < 1.0:
        truncating.append(f"--rollout-top-p {rollout.top_p}")
    if rollout.top_k != -1:
        truncating.append(f"--rollout-top-k {rollout.top_k}")
    if truncating:
        raise GopdError(
            f"{' and '.join(truncating)} truncates the sampling distribution: training responses "
            "must be samples of the student's full distribution at the sampling temperature, the "
            "one the trainer scores and differentiates (a truncated sampler's tokens and "
            "log-probs are of another distribution, and the policy gradient is biased); use "
            "--rollout-top-p 1 --rollout-top-k -1 (gopd-eval may truncate)"
        )


def _temperature(name: str, value: float | None, rollout_temperature: float) -> float:
    """A frozen role's scoring temperature: the rollout's unless given; finite and > 0."""
    if value is None:
        return rollout_temperature
    if not (math.isfinite(value) and value > 0):
        raise GopdError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_served(routing: Routing, models: ModelsConfig, loss: GOPDLossConfig) -> None:
    """What a role served by SGLang cannot do, refused before anything starts.

    SGLang's prompt log-probs (``input_token_logprobs``, what prefill scoring returns) are
    ``log_softmax`` of the raw logits whatever the request's sampling temperature (0.5.23
    ``srt/layers/logprob_processor.py``, ``InputLogprobProcessor``: no division by the
    temperature; in 0.5.4 the tempered branch of ``LogitsProcessor`` is dead code): a served role
    scores at temperature 1 only. The full-vocabulary estimator needs the role's logits next to
    the student's in every micro-batch, which an HTTP server does not hand out; the top-k one its
    log-probs of the student's top-k tokens at each position, which neither SGLang's
    ``top_logprobs_num`` (the server's own top tokens) nor ``token_ids_logprob`` (one token list
    per request) gives.
    """
    served = []
    if routing.teacher_urls:
        served.append(("teacher", "--teacher-urls", "--teacher-temperature"))
    if routing.reference_urls and any(lam != 1.0 for lam in routing.lambdas.values()):
        served.append(("reference", "--ref-urls", "--ref-temperature"))
    for role, urls_flag, temp_flag in served:
        temp = models.teacher_temperature if role == "teacher" else models.ref_temperature
        if temp != 1.0:
            raise GopdError(
                f"{urls_flag}: a {role} served by SGLang scores at temperature 1 only (its prompt "
                f"log-probs are log_softmax of the raw logits, whatever the request's "
                f"temperature), but the {role}'s temperature is {temp:g} ({temp_flag}, default "
                f"--rollout-temperature): pass {temp_flag} 1, or host the {role} in Megatron "
                f"({'--teacher-load' if role == 'teacher' else '--ref-load'})"
            )
        if loss.estimator == "full_vocab":
            raise GopdError(
                f"{urls_flag}: --gopd-estimator full_vocab needs the {role}'s whole next-token "
                f"distribution at every position (its logits next to the student's in every "
                f"micro-batch), which a served {role} does not return (SGLang hands back "
                f"log-probs of tokens, not logits); use --gopd-estimator sampled, or host the "
                f"{role} in Megatron"
            )
        if loss.estimator != "sampled":
            raise GopdError(
                f"{urls_flag}: --gopd-estimator {loss.estimator} needs the {role}'s log-probs of "
                f"the student's top-k tokens at every position, chosen in the update's own "
                f"forward pass; SGLang returns its own top tokens (top_logprobs_num) or one "
                f"token list per request (token_ids_logprob), not the student's per position; "
                f"use --gopd-estimator sampled, or host the {role} in Megatron"
            )


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Namespace -> TrainConfig, with every check that needs no file, model or server."""
    models = _from_args(ModelsConfig, args)
    if not models.student_load:
        raise GopdError("--student-load is required")
    routing = _from_args(Routing, args)
    routing.check()
    data = _from_args(DataConfig, args)
    if not data.prompt_data:
        raise GopdError("--prompt-data is required")
    refs = dict(routing.references)
    if not refs and not routing.reference_urls:
        refs = {DEFAULT_DOMAIN: models.student_load}
    n_teachers = len(routing.teachers) + len(routing.teacher_urls)
    if (
        DEFAULT_DOMAIN not in refs
        and DEFAULT_DOMAIN not in routing.reference_urls
        and n_teachers > len(refs) + len(routing.reference_urls)
    ):
        # per-domain references given for some domains only: the rest use the student's init
        refs = {DEFAULT_DOMAIN: models.student_load, **refs}
    lambdas = routing.lambdas or {DEFAULT_DOMAIN: 1.0}
    routing = dataclasses.replace(routing, references=refs, lambdas=lambdas)

    rollout = _from_args(RolloutConfig, args)
    if rollout.colocate:
        rollout = dataclasses.replace(rollout, sglang_enable_memory_saver=True)
    if rollout.engine == "external" and not rollout.urls:
        raise GopdError("--rollout-engine external needs --rollout-urls")
    if rollout.rollout_batch_size < 1 or rollout.n_samples_per_prompt < 1:
        raise GopdError("--rollout-batch-size and --n-samples-per-prompt must be >= 1")
    if rollout.prompts_per_request < 1 or rollout.max_in_flight < 1:
        raise GopdError("--rollout-prompts-per-request and --rollout-max-in-flight must be >= 1")
    _check_training_sampling(rollout)
    models = dataclasses.replace(
        models,
        teacher_temperature=_temperature(
            "--teacher-temperature", models.teacher_temperature, rollout.temperature
        ),
        ref_temperature=_temperature(
            "--ref-temperature", models.ref_temperature, rollout.temperature
        ),
    )
    if rollout.max_response_len < 1:
        raise GopdError(
            f"--max-response-len must be >= 1 (got {rollout.max_response_len}: every response "
            f"would be empty and the run would train on nothing)"
        )
    loss = _from_args(GOPDLossConfig, args)
    _check_served(routing, models, loss)
    cfg = _from_args(
        TrainConfig,
        args,
        parallel=_from_args(ParallelConfig, args),
        models=models,
        recompute=_from_args(RecomputeConfig, args),
        routing=routing,
        served=_from_args(ServedConfig, args),
        loss=loss,
        data=data,
        rollout=rollout,
        optim=_from_args(OptimConfig, args),
        checkpoint=_from_args(CheckpointConfig, args),
        eval=_from_args(EvalConfig, args),
        log=_from_args(LogConfig, args),
    )
    gbs = cfg.global_batch_size or rollout.samples_per_step
    if rollout.samples_per_step % gbs:
        raise GopdError(
            f"--global-batch-size {gbs} must divide the rollout batch of "
            f"{rollout.rollout_batch_size} prompts x {rollout.n_samples_per_prompt} samples = "
            f"{rollout.samples_per_step}"
        )
    if cfg.train_iters < 1:
        raise GopdError("--train-iters must be >= 1")
    if cfg.eval.interval and not data.eval_prompt_data:
        raise GopdError("--eval-interval needs --eval-prompt-data")
    longest = data.max_prompt_len + rollout.max_response_len
    budget = cfg.max_tokens_per_microbatch or cfg.micro_batch_size * longest
    if cfg.packing and budget < longest:
        raise GopdError(
            f"--max-tokens-per-microbatch {budget} cannot hold the longest sequence the run can "
            f"produce: --max-prompt-len {data.max_prompt_len} + --max-response-len "
            f"{rollout.max_response_len} = {longest} tokens"
        )
    return dataclasses.replace(cfg, global_batch_size=gbs, max_tokens_per_microbatch=budget)


def check_world(cfg: TrainConfig, world_size: int) -> None:
    """The checks that need the number of processes (known once torch.distributed is up, before
    any server or model starts): every update batch splits evenly over the data-parallel ranks.

    Each data-parallel rank trains on ``global batch / DP`` samples; a remainder used to be
    dropped silently (100 samples over 8 ranks trained on 96), and a batch smaller than DP left
    ranks training on all-masked padding rows."""
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    gbs = cfg.global_batch_size
    r = cfg.rollout
    if cfg.global_batch_size == r.samples_per_step:
        what = (
            f"update batch of {gbs} samples (--rollout-batch-size {r.rollout_batch_size} x "
            f"--n-samples-per-prompt {r.n_samples_per_prompt})"
        )
    else:
        what = f"--global-batch-size {gbs}"
    layout = (
        f"{world_size} processes / (TP {cfg.parallel.tp} x PP {cfg.parallel.pp}); use a multiple "
        f"of {dp} samples per update"
    )
    if gbs < dp:
        raise GopdError(
            f"the {what} is smaller than the {dp} data-parallel ranks ({layout}): some ranks "
            f"would train on padding only"
        )
    if gbs % dp:
        raise GopdError(
            f"the {what} is not divisible by the {dp} data-parallel ranks: each update would train "
            f"on {gbs - gbs % dp} and drop {gbs % dp} ({layout})"
        )
