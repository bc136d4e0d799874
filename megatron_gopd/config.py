"""Typed, validated configuration of a training job, built once from the parsed flags.

Everything below the driver receives these frozen dataclasses, never the argparse namespace.
:func:`build_config` checks what can be checked without touching a model or a server (flag
combinations, lambda values, domain routing); :func:`validate_inputs` then checks the files and
servers (checkpoints exist and share a vocabulary, the prompt data parses, the rollout servers
answer) so that every user mistake is one clear error *before* any GPU time is spent.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gopd.data import DEFAULT_DOMAIN
from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.gopd.fdiv import MAX_ABS_LOG_RATIO
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.utils import GopdError

__all__ = ["TrainConfig", "build_config"]


def _parse_domain_map(items: list[str] | None, what: str, convert=str) -> dict[str, object]:
    """``["PATH"]`` -> ``{"default": PATH}``; ``["a=P1", "b=P2"]`` -> ``{"a": P1, "b": P2}``."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            key, value = DEFAULT_DOMAIN, str(item)
        key = key.strip()
        if not key or not value:
            raise GopdError(f"{what}: cannot parse {item!r} (expected VALUE or DOMAIN=VALUE)")
        if key in out:
            raise GopdError(f"{what}: domain {key!r} given twice")
        try:
            out[key] = convert(value)
        except ValueError:
            raise GopdError(f"{what}: {value!r} is not a valid value for domain {key!r}") from None
    return out


@dataclass(frozen=True)
class ModelsConfig:
    student_load: str
    teacher_loads: dict[str, str]  # domain -> checkpoint ("default": every other domain)
    ref_loads: dict[str, str]  # domain -> checkpoint; default {"default": student_load}
    offload_frozen: bool = False
    bf16: bool = False
    transformer_impl: str = "auto"

    def teacher_key(self, domain: str) -> str:
        if domain in self.teacher_loads:
            return domain
        if DEFAULT_DOMAIN in self.teacher_loads:
            return DEFAULT_DOMAIN
        raise GopdError(f"domain {domain!r} has no teacher")

    def ref_key(self, domain: str) -> str:
        return domain if domain in self.ref_loads else DEFAULT_DOMAIN


@dataclass(frozen=True)
class GOPDConfig:
    lambdas: dict[str, float]  # domain -> lambda ("default" for the rest)
    estimator: str = "sampled"
    top_k: int = 64
    aggregation: str = "token_mean"
    tis_cap: float | None = None
    # OPD+ (objective "fdiv"): see megatron_gopd.gopd.fdiv
    objective: str = "gopd"
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    fdiv_correction: bool = True
    fdiv_max_log_ratio: float = MAX_ABS_LOG_RATIO

    def loss_config(self) -> GOPDLossConfig:
        """The loss configuration; raises ``LossConfigError`` (a ``GopdError``) naming the field
        for an invalid combination. :func:`build_config` calls it once to fail early."""
        return GOPDLossConfig(
            estimator=self.estimator,
            top_k=self.top_k,
            aggregation=self.aggregation,
            tis_cap=self.tis_cap,
            objective=self.objective,
            divergence=self.divergence,
            alpha=self.alpha,
            fdiv_correction=self.fdiv_correction,
            fdiv_max_log_ratio=self.fdiv_max_log_ratio,
        )

    def lam(self, domain: str) -> float:
        return float(self.lambdas.get(domain, self.lambdas.get(DEFAULT_DOMAIN, 1.0)))

    def needs_reference(self, domains) -> bool:
        """lambda == 1 is plain OPD: the reference term vanishes and is never computed."""
        return any(self.lam(d) != 1.0 for d in domains)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "sglang"
    urls: tuple[str, ...] = ()
    num_servers: int = 1
    rollout_batch_size: int = 32
    n_samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 1024
    max_in_flight: int = 256
    timeout_s: float = 600.0
    sglang_tp_size: int = 1
    sglang_mem_fraction_static: float = 0.6
    sglang_enable_memory_saver: bool = False
    sglang_base_gpu_id: int = 0
    colocate: bool = False
    weight_sync: str = "distributed"
    weight_sync_bucket_mb: int = 512
    weight_sync_check: bool = False

    @property
    def samples_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


@dataclass(frozen=True)
class DataConfig:
    prompt_data: str
    eval_prompt_data: str | None = None
    apply_chat_template: bool = False
    chat_template_kwargs: dict | None = None
    max_prompt_len: int = 1024
    tokenizer: str | None = None


@dataclass(frozen=True)
class LogConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_mode: str = "online"
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    parallel: ParallelConfig
    models: ModelsConfig
    gopd: GOPDConfig
    data: DataConfig
    rollout: RolloutConfig
    optim: OptimConfig
    log: LogConfig
    train_iters: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 0  # samples per optimizer step
    seed: int = 1234
    save: str | None = None
    load: str | None = None
    save_interval: int = 0
    exit_signal_handler: bool = False
    eval_interval: int = 0
    eval_n_samples: int = 1
    eval_grader: str = "math"
    extra: dict = field(default_factory=dict)

    @property
    def updates_per_step(self) -> int:
        return self.rollout.samples_per_step // self.global_batch_size

    @property
    def run_dir(self) -> Path | None:
        return Path(self.save) if self.save else None


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Namespace -> TrainConfig, with every flag-level check (no file or network access)."""
    if not args.student_load:
        raise GopdError("--student-load is required")
    if not args.teacher_load:
        raise GopdError("--teacher-load is required (DOMAIN=PATH per domain for multi-teacher)")
    if not args.prompt_data:
        raise GopdError("--prompt-data is required")
    teachers = _parse_domain_map(args.teacher_load, "--teacher-load")
    refs = _parse_domain_map(args.ref_load, "--ref-load") or {DEFAULT_DOMAIN: args.student_load}
    if DEFAULT_DOMAIN not in refs and len(teachers) > len(refs):
        # per-domain references given for some domains only: the rest use the student's init
        refs = {DEFAULT_DOMAIN: args.student_load, **refs}
    lambdas = _parse_domain_map(args.gopd_lambda, "--gopd-lambda", float) or {DEFAULT_DOMAIN: 1.0}
    for d, lam in lambdas.items():
        if not lam >= 0.0:  # also rejects NaN
            raise GopdError(f"--gopd-lambda {d}={lam}: lambda must be >= 0 (1 = OPD, >1 = ExOPD)")
    for d in lambdas:
        if d != DEFAULT_DOMAIN and d not in teachers and DEFAULT_DOMAIN not in teachers:
            raise GopdError(f"--gopd-lambda names domain {d!r}, which has no teacher")

    rollout = RolloutConfig(
        engine=args.rollout_engine,
        urls=tuple(args.rollout_urls or ()),
        num_servers=args.rollout_num_servers,
        rollout_batch_size=args.rollout_batch_size,
        n_samples_per_prompt=args.n_samples_per_prompt,
        temperature=args.rollout_temperature,
        top_p=args.rollout_top_p,
        top_k=args.rollout_top_k,
        max_response_len=args.max_response_len,
        max_in_flight=args.rollout_max_in_flight,
        timeout_s=args.rollout_timeout,
        sglang_tp_size=args.sglang_tp_size,
        sglang_mem_fraction_static=args.sglang_mem_fraction_static,
        sglang_enable_memory_saver=args.sglang_enable_memory_saver or args.rollout_colocate,
        sglang_base_gpu_id=args.sglang_base_gpu_id,
        colocate=args.rollout_colocate,
        weight_sync=args.weight_sync,
        weight_sync_bucket_mb=args.weight_sync_bucket_mb,
        weight_sync_check=args.weight_sync_check,
    )
    if rollout.engine == "external" and not rollout.urls:
        raise GopdError("--rollout-engine external needs --rollout-urls")
    if rollout.rollout_batch_size < 1 or rollout.n_samples_per_prompt < 1:
        raise GopdError("--rollout-batch-size and --n-samples-per-prompt must be >= 1")
    if rollout.temperature < 0:
        raise GopdError("--rollout-temperature must be >= 0")
    gbs = args.global_batch_size or rollout.samples_per_step
    if rollout.samples_per_step % gbs:
        raise GopdError(
            f"--global-batch-size {gbs} must divide the rollout batch of "
            f"{rollout.rollout_batch_size} prompts x {rollout.n_samples_per_prompt} samples = "
            f"{rollout.samples_per_step}"
        )
    if args.train_iters < 1:
        raise GopdError("--train-iters must be >= 1")
    if args.gopd_tis_cap is not None and args.gopd_tis_cap <= 0:
        raise GopdError("--gopd-tis-cap must be > 0")
    if args.eval_interval and not args.eval_prompt_data:
        raise GopdError("--eval-interval needs --eval-prompt-data")
    parallel = ParallelConfig(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.sequence_parallel
    )
    cfg = TrainConfig(
        parallel=parallel,
        models=ModelsConfig(
            student_load=args.student_load,
            teacher_loads=teachers,
            ref_loads=refs,
            offload_frozen=args.offload_frozen,
            bf16=args.bf16,
            transformer_impl=args.transformer_impl,
        ),
        gopd=GOPDConfig(
            lambdas=lambdas,
            estimator=args.gopd_estimator,
            top_k=args.gopd_top_k,
            aggregation=args.gopd_aggregation,
            tis_cap=args.gopd_tis_cap,
            objective=args.gopd_objective,
            divergence=args.fdiv_divergence,
            alpha=args.fdiv_alpha,
            fdiv_correction=args.fdiv_advantage == "corrected",
            fdiv_max_log_ratio=args.fdiv_max_log_ratio,
        ),
        data=DataConfig(
            prompt_data=args.prompt_data,
            eval_prompt_data=args.eval_prompt_data,
            apply_chat_template=args.apply_chat_template,
            chat_template_kwargs=args.chat_template_kwargs,
            max_prompt_len=args.max_prompt_len,
            tokenizer=args.tokenizer,
        ),
        rollout=rollout,
        optim=OptimConfig(
            lr=args.lr,
            min_lr=args.min_lr,
            lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        log=LogConfig(
            log_interval=args.log_interval,
            tensorboard_dir=args.tensorboard_dir,
            wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name,
            wandb_save_dir=args.wandb_save_dir,
            wandb_mode=args.wandb_mode,
            progress=not args.no_progress,
        ),
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=gbs,
        seed=args.seed,
        save=args.save,
        load=args.load,
        save_interval=args.save_interval,
        exit_signal_handler=args.exit_signal_handler,
        eval_interval=args.eval_interval,
        eval_n_samples=args.eval_n_samples,
        eval_grader=args.eval_grader,
    )
    cfg.gopd.loss_config()  # the loss flags (OPD+ included) are checked here, not mid-run
    return cfg
