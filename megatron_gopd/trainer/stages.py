"""The G-OPD trainer's stages. :mod:`~megatron_gopd.trainer.driver` calls them in order; this module
holds their state.

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

import contextlib
import dataclasses
import signal
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gopd import packing, parallel
from megatron_gopd.models.build import (
    RoleModel,
    build_role,
    final_hidden_states,
    output_rows,
    output_weight,
)
from megatron_gopd.models.checkpoint import CheckpointMeta, read_checkpoint_meta, resolve_checkpoint
from megatron_gopd.scoring import score_sequences
from megatron_gopd.trainer import checkpointing, distribute
from megatron_gopd.trainer.config import TrainConfig, check_world
from megatron_gopd.trainer.data import Prompt, PromptDataset, PromptIterator
from megatron_gopd.trainer.preflight import check_memory, load_tokenizer, validate_inputs
from megatron_gopd.trainer.served import ServedRoles
from megatron_gopd.trainer.tracking import (
    MetricsLogger,
    PhaseTimer,
    format_step_line,
    sum_reports,
)
from megatron_gopd.trainer.update import build_optimizer, collate, collate_packed, train_step
from megatron_gopd.types import PackedSeqs, Sample
from megatron_gopd.utils import GopdError, get_logger
from megatron_gopd.vocab_parallel.output_layer import FrozenLogits, OutputLayer

__all__ = ["GOPDTrainer", "RoleScores", "StepCounts"]

log = get_logger(__name__)


def _ps():
    from megatron.core import parallel_state as ps

    return ps


@dataclass
class RoleScores:
    """A frozen role's log-probs of this rank's samples, aligned with them: ``logprobs_T[i]`` is
    sample ``i``'s per-response-token log-probs, or None where the role did not score it (empty
    response; for the reference, a domain with lambda == 1)."""

    logprobs_T: list[torch.Tensor | None]
    sequences: int  # sequences the role's forward passes scored


@dataclass
class StepCounts:
    """Sequences each frozen role scored this step (the reference's is 0 in every step of a
    lambda == 1 run: the tests check that it is never run)."""

    teacher_sequences: int = 0
    reference_sequences: int = 0


class GOPDTrainer:
    def __init__(self, cfg: TrainConfig, rollout_factory: Callable):
        self.cfg = cfg
        self.timer = PhaseTimer()
        self.counts = StepCounts()
        self.tokenizer = load_tokenizer(cfg)
        inputs = validate_inputs(cfg, self.tokenizer)
        self.routing = inputs.routing  # domain -> teacher, reference or none, lambda
        # the memory of the layout and the rollout servers are checked before any model is built
        parallel.initialize(cfg.parallel, seed=cfg.seed)
        check_world(cfg, parallel.world_size())
        check_memory(cfg, self.routing, parallel.world_size())
        # teachers and references served by SGLang (--teacher-urls, --ref-urls): no model here
        self.served_teachers = ServedRoles(
            "teacher", self.routing.served_teachers, cfg.served, cfg.log.progress
        )
        self.served_refs = ServedRoles(
            "reference", self.routing.served_references, cfg.served, cfg.log.progress
        )
        error = None
        if parallel.is_rank0():
            try:
                self.served_teachers.check_reachable()
                self.served_refs.check_reachable()
            except GopdError as e:
                error = str(e)
        parallel.raise_rank0_error(error)
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
                offload=frozen and cfg.models.offload_frozen,  # the student stays put
                spec=cfg.models.transformer_impl,
                seed=cfg.seed,
                sequence_parallel=cfg.parallel.sequence_parallel,
                recompute=cfg.recompute,
            )
            if frozen:
                roles[key] = r
            return r

        self.student = role("student", cfg.models.student_load, frozen=False)
        # the hosted teachers some domain routes to (served ones have no model here)
        teachers = cfg.routing.teachers
        self.teachers = {
            k: role(f"teacher:{k}", teachers[k], True) for k in self.routing.teacher_keys
        }
        # only the references some domain needs (none at all when lambda == 1 everywhere)
        refs = cfg.routing.references
        self.refs = {k: role(f"reference:{k}", refs[k], True) for k in self.routing.reference_keys}
        self.meta: CheckpointMeta = read_checkpoint_meta(
            resolve_checkpoint(cfg.models.student_load)
        )
        self.tokenizer_dir = resolve_checkpoint(cfg.models.student_load) / "tokenizer"
        self.opt = build_optimizer(
            self.student.model, cfg.optim, train_iters=cfg.train_iters, bf16=cfg.models.bf16
        )
        if cfg.rollout.colocate and cfg.rollout.offload_train:
            from megatron_gopd.trainer.offload import TrainOffloader

            frozen = list(
                {id(r): r for r in [*self.teachers.values(), *self.refs.values()]}.values()
            )
            self.rollout.attach_trainer(TrainOffloader(self.student, self.opt, frozen))
        self.data = PromptIterator(PromptDataset(inputs.prompts), seed=cfg.seed)
        self.eval_prompts = inputs.eval_prompts
        self.start_step = 0
        self.skipped_updates = 0
        load = cfg.checkpoint.load
        if (
            load
            and not checkpointing.has_checkpoint(load)
            and not Path(load, "gopd_model.json").exists()
        ):
            if parallel.is_rank0():
                log.info(
                    "no checkpoint in %s yet: starting a new run from %s",
                    load,
                    cfg.models.student_load,
                )
        elif load:
            state = checkpointing.load_training_checkpoint(
                load, model=self.student.model, optimizer=self.opt.optimizer
            )
            self.opt.scheduler.load_state_dict(state["scheduler"])
            self.data.load_state_dict(state["data"])
            self.start_step = int(state["step"])
            self.skipped_updates = int(state.get("skipped_updates", 0))
            if parallel.is_rank0():
                log.info("resumed from %s at step %d", load, self.start_step)
        self._stop = False
        if cfg.checkpoint.exit_signal_handler:
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

    def _distribute(self, samples: list[Sample] | None, *, updates: int | None):
        """Rank 0's ``samples`` -> this data-parallel replica's share (each replica receives only
        its own: :mod:`megatron_gopd.trainer.distribute`), and its layout.

        Packed training (``updates``: the updates of this step): per update, the samples are
        split over the replicas by tokens and into as many token-budget micro-batches on every
        replica (:func:`megatron_gopd.packing.plan`); the layout is the micro-batch sizes per
        update, in the order of the share. Otherwise shares are balanced by tokens (packed
        evaluation) or dealt round-robin (padded), and the layout is None."""
        cfg = self.cfg
        _, dp = self.dp
        shares = layouts = None
        if parallel.is_rank0():
            lengths = [len(s.tokens) for s in samples]
            layouts = [None] * dp
            if not cfg.packing:
                shares = [samples[r::dp] for r in range(dp)]
            elif updates is None:
                shares = [[samples[i] for i in p] for p in packing.balanced_partition(lengths, dp)]
            else:
                per = len(samples) // updates
                shares, layouts = [[] for _ in range(dp)], [[] for _ in range(dp)]
                for u in range(updates):
                    plan = packing.plan(
                        lengths[u * per : (u + 1) * per], cfg.max_tokens_per_microbatch, dp
                    )
                    for r in range(dp):
                        layouts[r].append([len(mb) for mb in plan[r]])
                        shares[r].extend(samples[u * per + i] for mb in plan[r] for i in mb)
        return distribute.scatter_samples(shares, layouts)

    # ------------------------------------------------------------------ stages

    def generate(
        self, prompts: list[Prompt], *, n: int, seed: int, temperature: float | None = None
    ) -> list[Sample] | None:
        """Student responses to ``prompts`` on rank 0 (it asks the servers; None elsewhere:
        :meth:`_distribute` sends each rank its share). Colocated servers get the GPUs for the
        duration (``serving``); a rank-0 error is raised on every rank."""
        samples, error = None, None
        with self.rollout.serving(self.student):
            if parallel.is_rank0():
                try:
                    samples = self.rollout.sample(prompts, n=n, seed=seed, temperature=temperature)
                except GopdError as e:
                    error = str(e)
        parallel.raise_rank0_error(error)
        return samples

    def rollout_step(self, step: int) -> list[Sample]:
        prompts = self.data.next(self.cfg.rollout.rollout_batch_size)
        samples = self.generate(
            prompts, n=self.cfg.rollout.n_samples_per_prompt, seed=self.cfg.seed * 100003 + step
        )
        mine, self._layout = self._distribute(samples, updates=self.cfg.updates_per_step)
        return mine

    def _response_logprobs(
        self, role: RoleModel, samples: list[Sample], temperature: float
    ) -> list[torch.Tensor]:
        """``role``'s log-probs at ``temperature`` of each sample's response tokens (samples with
        a response)."""
        cfg = self.cfg
        lps = score_sequences(
            role,
            [s.tokens for s in samples],
            micro_batch_size=cfg.micro_batch_size,
            temperature=temperature,
            max_tokens=cfg.max_tokens_per_microbatch if cfg.packing else None,
        )
        return [
            lp[len(s.prompt_ids) - 1 : len(s.prompt_ids) - 1 + s.response_len]
            for s, lp in zip(samples, lps, strict=True)
        ]

    def _score(
        self,
        samples: list[Sample],
        key_of: Callable[[Sample], str | None],
        roles: dict[str, RoleModel],
        temperature: float,
        served: ServedRoles,
    ) -> RoleScores:
        """Each sample scored by the role ``key_of(sample)`` names (None: not scored): the
        served roles' samples go to their servers first (one collective for all of them), then
        the hosted roles run one after the other, so that a role's forward passes see only its
        own samples."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            k = key_of(s)
            if k is not None and s.response_len > 0:
                groups[k].append(i)
        out: list[torch.Tensor | None] = [None] * len(samples)
        if served:
            remote = {k: [samples[i] for i in groups.get(k, [])] for k in served.urls}
            for k, lps in served.score(remote).items():
                for i, lp in zip(groups.get(k, []), lps, strict=True):
                    out[i] = lp
        # an MoE role at EP > 1 runs on every rank of its expert group, with or without samples
        for k, role in roles.items():
            if role.lockstep_group is not None:
                groups.setdefault(k, [])
        for k in sorted(groups):
            if k in served.urls:
                continue
            mine = [samples[i] for i in groups[k]]
            lps = self._response_logprobs(roles[k], mine, temperature)
            for i, lp in zip(groups[k], lps, strict=True):
                out[i] = lp
        return RoleScores(out, sum(len(g) for g in groups.values()))

    def score_teachers(self, samples: list[Sample]) -> RoleScores:
        """log pi*(y_t) of every response token, from the teacher of the sample's domain, at the
        teachers' temperature (by default the sampling temperature)."""
        scores = self._score(
            samples,
            lambda s: self.routing[s.domain].teacher,
            self.teachers,
            self.cfg.models.teacher_temperature,
            self.served_teachers,
        )
        for s, lp in zip(samples, scores.logprobs_T, strict=True):
            if lp is not None:
                s.teacher_logprobs_T = lp
        self.counts.teacher_sequences += scores.sequences
        return scores

    def score_reference(self, samples: list[Sample]) -> RoleScores:
        """log pi_ref(y_t), only for samples of domains with lambda != 1: for the others the
        reference term (lambda - 1) * (...) is zero and their reference is never run."""
        if not self.routing.needs_reference:
            return RoleScores([None] * len(samples), 0)
        scores = self._score(
            samples,
            lambda s: self.routing[s.domain].reference,
            self.refs,
            self.cfg.models.ref_temperature,
            self.served_refs,
        )
        for s, lp in zip(samples, scores.logprobs_T, strict=True):
            # lambda == 1 for its domain (or no response): a placeholder the loss multiplies by 0
            s.ref_logprobs_T = lp if lp is not None else torch.zeros(s.response_len)
        self.counts.reference_sequences += scores.sequences
        return scores

    def update(self, samples: list[Sample]) -> dict[str, float]:
        with contextlib.ExitStack() as held:
            if self.cfg.loss.estimator != "sampled":
                # the full-vocabulary estimators run the frozen roles in every micro-batch (and
                # read their output weights again in its backward): on the device for the whole
                # phase, so that --offload-frozen moves each once per step, not per micro-batch
                frozen = {id(r): r for r in [*self.teachers.values(), *self.refs.values()]}
                for role in frozen.values():
                    held.enter_context(role.in_use())
            reports, stats = self._update_batches(samples)
        metrics = self._reduce_to_rank0(reports)
        metrics.update(stats)
        # updates skipped for a non-finite gradient norm: this step's, and the run's so far
        self.skipped_updates += int(stats["optim/update_skipped"])
        metrics["counters/skipped_updates"] = float(self.skipped_updates)
        return metrics

    def _update_batches(self, samples: list[Sample]) -> tuple[list[dict], dict[str, float]]:
        cfg = self.cfg
        _, dp = self.dp
        per_update = cfg.global_batch_size // dp
        reports, stats, skipped = [], {}, 0.0
        frozen = self._frozen_logits if cfg.loss.estimator != "sampled" else None
        how = dict(
            domains=self.routing.domains,
            lam_of=lambda d: self.routing[d].lam,
            with_ref=self.routing.needs_reference,
            sequence_multiple=self.student.sequence_multiple,
        )
        at = 0
        for u in range(cfg.updates_per_step):
            if cfg.packing:  # this replica's micro-batches of update u, as planned on rank 0
                batch = []
                for n in self._layout[u]:
                    batch.append(collate_packed(samples[at : at + n], **how))
                    at += n
            else:
                part = samples[u * per_update : (u + 1) * per_update]
                batch = collate(part, pad_rows_to=cfg.micro_batch_size, **how)
            r, stats = train_step(
                self.opt,
                batch,
                micro_batch_size=cfg.micro_batch_size,
                loss_cfg=cfg.loss,
                vocab_size=self.student.arch.vocab_size,
                temperature=cfg.rollout.temperature,
                frozen_logits=frozen,
            )
            reports.extend(r)
            skipped += stats["optim/update_skipped"]
        return reports, dict(stats, **{"optim/update_skipped": skipped})

    def sync_weights(self) -> None:
        self.rollout.push_weights(self.student)

    # ------------------------------------------------------------------ loss plumbing

    @torch.no_grad()
    def _frozen_logits(self, mb) -> tuple[FrozenLogits, FrozenLogits | None]:
        """The teacher's and the reference's output layers for a micro-batch (full-vocabulary
        estimators, PP=1): their final hidden states and output weights, each row with its own
        domain's teacher (and reference) at their scoring temperatures. Their fp32 logits are made
        chunk by chunk inside the loss, never for the whole micro-batch."""
        B, S = mb.tokens_BS.shape
        dev = mb.tokens_BS.device
        pos = torch.arange(S, device=dev).unsqueeze(0).expand_as(mb.tokens_BS)
        routes = [self.routing[mb.domains[i]] for i in mb.domain_ids_B.tolist()]
        cols = torch.arange(S, device=dev)
        packed = mb.packed

        def run(role, rows):
            """The role's final hidden states for micro-batch rows ``rows`` and the token rows
            (of the micro-batch's own layout) they stand for."""
            if packed is None:
                with final_hidden_states(role.model):
                    hidden = role.model(mb.tokens_BS[rows], pos[rows], None)
                return hidden, (rows.unsqueeze(1) * S + cols).reshape(-1), len(rows) * S
            # a pack of its own sequences; the micro-batch's tail padding rides with the first role
            idx = rows.tolist()
            seqs = [
                packed.tokens_1T[0, packed.starts[i] : packed.starts[i] + packed.lengths[i]]
                for i in idx
            ]
            spans = [
                torch.arange(packed.starts[i], packed.starts[i] + packed.lengths[i]) for i in idx
            ]
            used = sum(packed.lengths)
            if tail_owner[0] is None and packed.num_tokens > used:
                tail_owner[0] = role
                seqs.append(torch.zeros(packed.num_tokens - used, dtype=torch.long, device=dev))
                spans.append(torch.arange(used, packed.num_tokens))
            sub = PackedSeqs.of([s.tolist() for s in seqs], self.student.sequence_multiple, dev)
            with final_hidden_states(role.model):
                hidden = role.model(sub.tokens_1T, None, None, packed_seq_params=sub.params())
            n = sum(len(x) for x in spans)
            return hidden, torch.cat(spans).to(dev), n

        tail_owner = [None]

        def by_row(roles, key_of, temperature):
            parts, index = [], []
            tail_owner[0] = None
            for k in sorted({key_of(r) for r in routes} - {None}):
                rows = torch.tensor([i for i, r in enumerate(routes) if key_of(r) == k], device=dev)
                role = roles[k]
                # held on the device by update() for the whole phase (its backward reads the
                # output weight again): this block does not move it
                with role.in_use():
                    out = run(role, rows)
                hidden_rows = output_rows(role.model, out[0], grad=False)
                hidden_rows = hidden_rows[: out[2]]  # not the sub-pack's own tail padding
                parts.append(
                    OutputLayer(
                        hidden_rows,
                        output_weight(role.model),
                        role.arch.vocab_size,
                        temperature=temperature,
                    )
                )
                index.append(out[1])  # its token rows
            n_rows = B * S if packed is None else packed.num_tokens
            return FrozenLogits(tuple(parts), tuple(index), n_rows)

        models = self.cfg.models
        teacher = by_row(self.teachers, lambda r: r.teacher, models.teacher_temperature)
        ref = None
        if self.routing.needs_reference:
            ref = by_row(self.refs, lambda r: r.reference, models.ref_temperature)
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
        metrics = parallel.broadcast_object(
            metrics,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
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
        if not self.cfg.checkpoint.save:
            return
        with self.timer("save"):
            state = {
                "scheduler": self.opt.scheduler.state_dict(),
                "data": self.data.state_dict(),
                "skipped_updates": self.skipped_updates,
            }
            meta = dataclasses.replace(self.meta, extra=dict(self.meta.extra, trained_steps=step))
            checkpointing.save_training_checkpoint(
                self.cfg.checkpoint.save,
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
                self.eval_prompts, n=self.cfg.eval.n_samples, seed=self.cfg.seed + 7
            )
            mine, _ = self._distribute(samples, updates=None)
            answered = [s for s in mine if s.response_len > 0]
            student_lps = (
                self._response_logprobs(self.student, answered, self.cfg.rollout.temperature)
                if answered
                else []
            )
            self.score_teachers(mine)
            # sum of log-ratios, tokens, correct, graded, samples
            acc = torch.zeros(5, dtype=torch.float64)
            acc[4] = len(mine)
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
        out["eval/response_len"] = acc[1].item() / max(acc[4].item(), 1)
        return out

    def _correct(self, response: str, answer: str) -> bool:
        """``response`` is the decoded response. ``exact``: equal to the answer as the same
        tokenizer encodes and decodes it, so that how the tokenizer joins pieces does not
        matter (a word-level tokenizer decodes ``1801`` as ``'1 8 0 1'``); surrounding whitespace
        is ignored."""
        if self.cfg.eval.grader == "exact":
            response, answer = response.strip(), answer.strip()
            if response == answer:
                return True
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            return response == self.tokenizer.decode(ids, skip_special_tokens=True).strip()
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
        metrics["counters/reference_sequences"] = float(self.counts.reference_sequences)
        self.counts = StepCounts()
        self.logger.log(step, metrics)
        if parallel.is_rank0() and (
            step % self.cfg.log.log_interval == 0 or step == self.cfg.train_iters
        ):
            log.info(format_step_line(step, self.cfg.train_iters, metrics))
        return metrics

    def _on_sigterm(self, signum, frame) -> None:
        if not self._stop and parallel.is_rank0():
            log.warning("SIGTERM: the run stops after this step, with a checkpoint")
        self._stop = True

    def stop_requested(self) -> bool:
        """Any rank got SIGTERM (``--exit-signal-handler``): all ranks agree, so that they save
        and leave together. One tiny all-reduce per step."""
        if not self.cfg.checkpoint.exit_signal_handler:
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
