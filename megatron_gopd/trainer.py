"""The G-OPD trainer's stages. ``train.py`` calls them in order; this module holds their state.

One step::

    prompts  --rollout-->  samples (student responses; rollout log-probs)
             --teacher-->  teacher log-probs (each sample's domain routes it to its teacher)
             --reference-> reference log-probs (skipped entirely when lambda == 1 for a domain)
             --update--->  advantages + policy-gradient step of the student
             --sync----->  student weights pushed to the rollout servers

Data parallelism: every rank walks the prompt order identically (seeded), global rank 0 talks to
the rollout servers and broadcasts the samples, and each data-parallel replica scores and trains on
its share. Tensor/pipeline-parallel ranks of a replica see the same samples.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gopd import checkpointing, parallel
from megatron_gopd.config import TrainConfig
from megatron_gopd.data import Prompt, PromptDataset, PromptIterator, load_prompts
from megatron_gopd.models import (
    CheckpointMeta,
    RoleModel,
    build_role,
    check_vocab_compatible,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from megatron_gopd.scoring import score_sequences
from megatron_gopd.tracking import MetricsLogger, PhaseTimer, format_step_line, sum_reports
from megatron_gopd.types import Sample
from megatron_gopd.update import build_optimizer, collate, train_step
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["GOPDTrainer"]

log = get_logger(__name__)


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def _broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def load_tokenizer(cfg: TrainConfig):
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


def validate_inputs(cfg: TrainConfig, tokenizer) -> tuple[list[Prompt], list[Prompt] | None]:
    """Every check that needs files but no model: checkpoints exist and share the student's
    vocabulary, a reference exists where lambda != 1, the prompt data parses. Cheap and identical
    on every rank, so every rank raises the same error."""
    student = read_checkpoint_meta(resolve_checkpoint(cfg.models.student_load)).arch
    for key, path in cfg.models.teacher_loads.items():
        arch = read_checkpoint_meta(resolve_checkpoint(path)).arch
        check_vocab_compatible(student, arch, f"teacher ({key})" if key != "default" else "teacher")
    teacher_domains = (
        None if "default" in cfg.models.teacher_loads else set(cfg.models.teacher_loads)
    )

    def load(path):
        return load_prompts(
            path,
            tokenizer,
            apply_chat_template=cfg.data.apply_chat_template,
            known_domains=teacher_domains,
            max_prompt_len=cfg.data.max_prompt_len,
            chat_template_kwargs=cfg.data.chat_template_kwargs,
        )

    prompts = load(cfg.data.prompt_data)
    eval_prompts = load(cfg.data.eval_prompt_data) if cfg.data.eval_prompt_data else None
    domains = {p.domain for p in prompts} | {p.domain for p in eval_prompts or []}
    for d in sorted(domains):
        if cfg.gopd.lam(d) != 1.0:
            path = cfg.models.ref_loads.get(cfg.models.ref_key(d))
            if path is None:
                raise GopdError(
                    f"domain {d!r} has lambda {cfg.gopd.lam(d)} != 1 and needs a reference: "
                    f"give --ref-load (default: the student's initial checkpoint)"
                )
            check_vocab_compatible(
                student, read_checkpoint_meta(resolve_checkpoint(path)).arch, f"reference ({d})"
            )
    if cfg.gopd.estimator != "sampled" and cfg.parallel.pp > 1:
        raise GopdError(
            f"--gopd-estimator {cfg.gopd.estimator} needs the frozen roles' logits at the "
            f"student's last stage: use --pipeline-model-parallel-size 1"
        )
    return prompts, eval_prompts


class GOPDTrainer:
    def __init__(self, cfg: TrainConfig, rollout_factory):
        self.cfg = cfg
        self.timer = PhaseTimer()
        self.counters: Counter[str] = Counter()  # e.g. reference forward passes (checked by tests)
        self.tokenizer = load_tokenizer(cfg)
        prompts, eval_prompts = validate_inputs(cfg, self.tokenizer)
        self.domains = sorted({p.domain for p in prompts} | {p.domain for p in eval_prompts or []})
        self.needs_ref = cfg.gopd.needs_reference(self.domains)
        # the rollout servers are checked (rank 0) before any model is built
        parallel.initialize(cfg.parallel, seed=cfg.seed)
        self.rollout = rollout_factory(cfg, self.tokenizer)
        self.rollout.check_reachable()

        dtype = torch.bfloat16 if cfg.models.bf16 else torch.float32
        roles: dict[str, RoleModel] = {}

        def role(name, path, frozen):
            key = str(resolve_checkpoint(path).resolve())
            if frozen and key in roles:  # one model for a checkpoint used by several roles
                return roles[key]
            r = build_role(
                name,
                path,
                frozen=frozen,
                params_dtype=dtype,
                offload=cfg.models.offload_frozen,
                spec=cfg.models.transformer_impl,
                seed=cfg.seed,
                sequence_parallel=cfg.parallel.sequence_parallel,
            )
            if frozen:
                roles[key] = r
            return r

        self.student = role("student", cfg.models.student_load, frozen=False)
        self.teachers = {
            k: role(f"teacher:{k}", p, True) for k, p in cfg.models.teacher_loads.items()
        }
        self.refs: dict[str, RoleModel] = {}
        if self.needs_ref:
            keys = {cfg.models.ref_key(d) for d in self.domains if cfg.gopd.lam(d) != 1.0}
            self.refs = {
                k: role(f"reference:{k}", cfg.models.ref_loads[k], True) for k in sorted(keys)
            }
        self.meta: CheckpointMeta = read_checkpoint_meta(
            resolve_checkpoint(cfg.models.student_load)
        )
        self.tokenizer_dir = resolve_checkpoint(cfg.models.student_load) / "tokenizer"
        self.opt = build_optimizer(
            self.student.model, cfg.optim, train_iters=cfg.train_iters, bf16=cfg.models.bf16
        )
        self.data = PromptIterator(PromptDataset(prompts), seed=cfg.seed)
        self.eval_prompts = eval_prompts
        self.start_step = 0
        if (
            cfg.load
            and not checkpointing.has_checkpoint(cfg.load)
            and not Path(cfg.load, "gopd_model.json").exists()
        ):
            if dist.get_rank() == 0:
                log.info(
                    "no checkpoint in %s yet: starting a new run from %s",
                    cfg.load,
                    cfg.models.student_load,
                )
        elif cfg.load:
            state = checkpointing.load_training_checkpoint(
                cfg.load, model=self.student.model, optimizer=self.opt.optimizer
            )
            self.opt.scheduler.load_state_dict(state["scheduler"])
            self.data.load_state_dict(state["data"])
            self.start_step = int(state["step"])
            if dist.get_rank() == 0:
                log.info("resumed from %s at step %d", cfg.load, self.start_step)
        self._stop = False
        if cfg.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.logger = MetricsLogger(
            cfg.run_dir, cfg.log, run_config=dataclasses.asdict(cfg), resume_step=self.start_step
        )
        # the servers start from the student's weights as they are now (initial or resumed)
        with self.timer("sync"):
            self.rollout.push_weights(self.student)

    # ------------------------------------------------------------------ layout helpers

    @property
    def dp(self) -> tuple[int, int]:
        ps = _ps()
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def _my_share(self, samples: list[Sample]) -> list[Sample]:
        rank, size = self.dp
        return samples[rank::size]

    # ------------------------------------------------------------------ stages

    def generate(
        self, prompts: list[Prompt], *, n: int, seed: int, temperature: float | None = None
    ) -> list[Sample]:
        """Student responses to ``prompts`` (rank 0 asks the servers; every rank gets them)."""
        samples = None
        if dist.get_rank() == 0:
            samples = self.rollout.sample(prompts, n=n, seed=seed, temperature=temperature)
        return _broadcast_object(samples)

    def rollout_step(self, step: int) -> list[Sample]:
        prompts = self.data.next(self.cfg.rollout.rollout_batch_size)
        samples = self.generate(
            prompts, n=self.cfg.rollout.n_samples_per_prompt, seed=self.cfg.seed * 100003 + step
        )
        self.rollout.release_memory()  # colocated servers give the GPUs back to the trainer
        return self._my_share(samples)

    def _response_logprobs(self, role: RoleModel, samples: list[Sample]) -> list[torch.Tensor]:
        """``role``'s log-probs of each sample's response tokens (samples with a response)."""
        lps = score_sequences(
            role, [s.tokens for s in samples], micro_batch_size=self.cfg.micro_batch_size
        )
        return [
            lp[len(s.prompt_ids) - 1 : len(s.prompt_ids) - 1 + s.response_len]
            for s, lp in zip(samples, lps, strict=True)
        ]

    def _score_by(
        self, samples: list[Sample], key_of, roles: dict[str, RoleModel], field: str
    ) -> None:
        groups: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            k = key_of(s)
            if k is not None and s.response_len > 0:
                groups[k].append(s)
        for k in sorted(groups):
            self.counters[f"{field}_sequences"] += len(groups[k])
            for s, lp in zip(groups[k], self._response_logprobs(roles[k], groups[k]), strict=True):
                setattr(s, field, lp)

    def score_teachers(self, samples: list[Sample]) -> None:
        self._score_by(
            samples,
            lambda s: self.cfg.models.teacher_key(s.domain),
            self.teachers,
            "teacher_logprobs_T",
        )

    def score_reference(self, samples: list[Sample]) -> None:
        """Only samples of domains with lambda != 1: for the others the reference term is zero."""
        if not self.needs_ref:
            return
        cfg = self.cfg
        self._score_by(
            samples,
            lambda s: cfg.models.ref_key(s.domain) if cfg.gopd.lam(s.domain) != 1.0 else None,
            self.refs,
            "ref_logprobs_T",
        )
        for s in samples:
            if s.ref_logprobs_T is None:  # lambda == 1 for its domain: (lambda - 1) * anything = 0
                s.ref_logprobs_T = torch.zeros(s.response_len)

    def update(self, samples: list[Sample]) -> dict[str, float]:
        cfg = self.cfg
        _, dp = self.dp
        per_update = cfg.global_batch_size // dp
        reports, stats = [], {}
        loss_cfg = self._loss_config()
        frozen = self._frozen_logits if cfg.gopd.estimator != "sampled" else None
        for u in range(cfg.updates_per_step):
            part = samples[u * per_update : (u + 1) * per_update]
            batch = collate(
                part,
                domains=self.domains,
                lam_of=cfg.gopd.lam,
                with_ref=self.needs_ref,
                pad_rows_to=cfg.micro_batch_size,
                sequence_multiple=self.student.sequence_multiple,
            )
            r, stats = train_step(
                self.opt,
                batch,
                micro_batch_size=cfg.micro_batch_size,
                loss_cfg=loss_cfg,
                vocab_size=self.student.arch.vocab_size,
                frozen_logits=frozen,
            )
            reports.extend(r)
        metrics = self._reduce_to_rank0(reports)
        metrics.update(stats)
        return metrics

    def sync_weights(self) -> None:
        self.rollout.push_weights(self.student)

    # ------------------------------------------------------------------ loss plumbing

    def _loss_config(self):
        return self.cfg.gopd.loss_config()  # G-OPD and OPD+ (fdiv) fields, validated there

    @torch.no_grad()
    def _frozen_logits(self, mb):
        """Teacher / reference logit shards for a micro-batch (full-vocabulary estimators, PP=1):
        each row takes the logits of its own domain's teacher (and reference)."""
        S = mb.tokens_BS.shape[1]
        pos = torch.arange(S, device=mb.tokens_BS.device).unsqueeze(0).expand_as(mb.tokens_BS)
        domains = [mb.domains[i] for i in mb.domain_ids_B.tolist()]

        def by_row(roles, key_of):
            out = None
            for k in sorted({key_of(d) for d in domains} - {None}):
                rows = torch.tensor(
                    [i for i, d in enumerate(domains) if key_of(d) == k], device=pos.device
                )
                with roles[k].in_use():
                    logits = roles[k].model(mb.tokens_BS[rows], pos[rows], None)
                if out is None:
                    out = logits.new_zeros((len(domains), *logits.shape[1:]))
                out[rows] = logits
            return out

        teacher = by_row(self.teachers, self.cfg.models.teacher_key)
        ref = None
        if self.needs_ref:
            lam = self.cfg.gopd.lam
            ref = by_row(self.refs, lambda d: self.cfg.models.ref_key(d) if lam(d) != 1.0 else None)
        return teacher, ref

    def _reduce_to_rank0(self, reports: list[dict]) -> dict[str, float]:
        """Loss reports live on the last pipeline stage: sum them over data-parallel ranks there,
        finalize (one division), and hand the numbers to global rank 0 (the first stage when
        PP > 1). Keys become ``train/<metric>`` and ``train/<domain>/<metric>``."""
        from megatron_gopd.gopd import finalize_report

        ps = _ps()
        metrics = None
        if ps.is_pipeline_last_stage():
            summed = sum_reports(reports, group=ps.get_data_parallel_group())
            metrics = {f"train/{k}": v for k, v in finalize_report(summed).items()}
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [metrics]
            dist.broadcast_object_list(
                box,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
            metrics = box[0]
        return dict(metrics or {})

    # ------------------------------------------------------------------ end of step

    def rollout_metrics(self, samples: list[Sample]) -> dict[str, float]:
        """Statistics of this step's samples (all DP shards) for the console and the logs."""
        lens = torch.tensor([float(s.response_len) for s in samples]) if samples else torch.zeros(1)
        counts = torch.tensor(
            [
                float(len(samples)),
                float(sum(s.finish_reason == "length" for s in samples)),
                lens.sum().item(),
                float(sum(len(s.tokens) for s in samples)),
            ]
        )
        ps = _ps()
        if self.dp[1] > 1:
            dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=False))
        n = max(counts[0].item(), 1.0)
        return {
            "rollout/samples": counts[0].item(),
            "rollout/truncated_frac": counts[1].item() / n,
            "rollout/response_len": counts[2].item() / n,
            "rollout/response_tokens": counts[2].item(),
            "rollout/total_tokens": counts[3].item(),
        }

    def save(self, step: int) -> None:
        if not self.cfg.save:
            return
        with self.timer("save"):
            state = {"scheduler": self.opt.scheduler.state_dict(), "data": self.data.state_dict()}
            meta = dataclasses.replace(self.meta, extra=dict(self.meta.extra, trained_steps=step))
            checkpointing.save_training_checkpoint(
                self.cfg.save,
                step,
                model=self.student.model,
                optimizer=self.opt.optimizer,
                meta=meta,
                trainer_state=state,
                tokenizer_dir=self.tokenizer_dir,
            )

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Fixed prompts, fixed sampling seeds: reverse KL to the teacher (Megatron log-probs of
        the student's own samples) and, where prompts carry an ``answer``, accuracy."""
        if not self.eval_prompts:
            return {}
        with self.timer("eval"):
            samples = self.generate(
                self.eval_prompts, n=self.cfg.eval_n_samples, seed=self.cfg.seed + 7
            )
            mine = self._my_share(samples)
            answered = [s for s in mine if s.response_len > 0]
            student_lps = self._response_logprobs(self.student, answered) if answered else []
            self.score_teachers(mine)
            acc = torch.zeros(4, dtype=torch.float64)  # sum of log-ratios, tokens, correct, graded
            for s, lp in zip(answered, student_lps, strict=True):
                acc[0] += (lp - s.teacher_logprobs_T).sum().item()
                acc[1] += s.response_len
            for s in mine:
                if "answer" in s.metadata:
                    text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
                    acc[2] += float(self._correct(text, str(s.metadata["answer"])))
                    acc[3] += 1
            if self.dp[1] > 1:
                dist.all_reduce(acc, group=_ps().get_data_parallel_group())
        out = {"eval/reverse_kl": (acc[0] / acc[1]).item() if acc[1] else float("nan")}
        if acc[3]:
            out["eval/accuracy"] = (acc[2] / acc[3]).item()
        out["eval/response_len"] = acc[1].item() / max(len(samples), 1)
        return out

    def _correct(self, response: str, answer: str) -> bool:
        if self.cfg.eval_grader == "exact":
            return response.strip() == answer.strip()
        from megatron_gopd.evaluation.math_grader import grade_math

        return grade_math(response, answer).correct

    def log_step(
        self, step: int, metrics: dict[str, float], t_step: float, samples_metrics: dict[str, float]
    ):
        metrics = dict(metrics, **samples_metrics, **self.timer.pop())
        metrics["time/step"] = t_step
        metrics["perf/tokens_per_s"] = samples_metrics.get("rollout/total_tokens", 0.0) / max(
            t_step, 1e-9
        )
        # sequences scored by the reference this step (0 for every step of a lambda == 1 run)
        metrics["counters/reference_sequences"] = float(
            self.counters.pop("ref_logprobs_T_sequences", 0)
        )
        self.counters.clear()
        self.logger.log(step, metrics)
        if dist.get_rank() == 0 and (
            step % self.cfg.log.log_interval == 0 or step == self.cfg.train_iters
        ):
            log.info(format_step_line(step, self.cfg.train_iters, metrics))
        return metrics

    def _on_sigterm(self, signum, frame) -> None:
        if not self._stop and dist.get_rank() == 0:
            log.warning("SIGTERM: the run stops after this step, with a checkpoint")
        self._stop = True

    def stop_requested(self) -> bool:
        """Any rank got SIGTERM (``--exit-signal-handler``): all ranks agree, so that they save
        and leave together. One tiny all-reduce per step."""
        if not self.cfg.exit_signal_handler:
            return False
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if dist.get_world_size() > 1:
            from megatron_gopd import platform

            flag = flag.to(platform.device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        self.logger.close()
        self.rollout.shutdown()
