"""Teachers and references served by SGLang on nodes of their own (``--teacher-urls``,
``--ref-urls``): the trainer sends the sampled sequences for prefill scoring and gets back the
log-probs of the response tokens.

Why serve a frozen role instead of hosting it in Megatron: a hosted role lives on the student's
tensor/pipeline/expert-parallel ranks, so the largest teacher a job holds is set by the student's
layout and shares its GPUs' memory; a served one runs with its own TP/EP/DP (any model SGLang
serves: Qwen3-235B-A22B, DeepSeek, ...), and what crosses the network per step is token ids
(a few bytes per token each way), never weights: served roles are frozen and get no weight sync.

What a served role cannot do (refused in :func:`megatron_gopd.trainer.config.build_config`):
score at a temperature other than 1 (SGLang's prompt log-probs are ``log_softmax`` of the raw
logits, whatever the request's temperature: 0.5.23 ``srt/layers/logprob_processor.py``), and feed
the full-vocabulary or top-k estimators (they need the role's logits in every micro-batch).

The request (:meth:`~megatron_gopd.rollout.client.RolloutClient.score`): ``input_ids = prompt +
response``, ``sampling_params.max_new_tokens = 0``, ``return_logprob``, ``logprob_start_len =
len(prompt) - 1``; SGLang answers ``len(response) + 1`` entries, the first null, then ``log p(y_t
| prompt, y_<t)`` for every response token. Many sequences per request
(``--served-sequences-per-request``), at most ``--served-max-in-flight`` requests per server,
retried with backoff and failed over across a role's URLs.

Rank layout: each data-parallel replica scores its own share of the samples. The first rank of
its model-parallel group (tensor x pipeline) asks the servers and broadcasts the scores to the
other ranks of the group, as global rank 0 does with the rollout's samples; an error on any
replica stops every rank together.

API keys: ``GOPD_TEACHER_API_KEY`` for the teachers' servers and ``GOPD_REF_API_KEY`` for the
references' (their ``--api-key``), read from the environment so that they stay out of command
lines and run configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_gopd import parallel
from megatron_gopd.flags import flag
from megatron_gopd.types import Sample
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["ServedConfig", "ServedRoles", "served_auth"]

log = get_logger(__name__)

TEACHER_KEY_ENV = "GOPD_TEACHER_API_KEY"
REF_KEY_ENV = "GOPD_REF_API_KEY"


@dataclass(frozen=True)
class ServedConfig:
    """How the trainer talks to served teachers and references."""

    FLAG_GROUP = "models"

    served_sequences_per_request: int = flag(
        16, help="sequences per prefill-scoring request to a served teacher or reference"
    )
    served_max_in_flight: int = flag(
        8, help="prefill-scoring requests in flight per served teacher/reference server"
    )
    served_timeout_s: float = flag(
        1800.0, help="seconds a prefill-scoring request may take before it is retried"
    )

    def __post_init__(self):
        if self.served_sequences_per_request < 1 or self.served_max_in_flight < 1:
            raise GopdError(
                "--served-sequences-per-request and --served-max-in-flight must be >= 1"
            )


def served_auth(kind: str, environ=None):
    """The API key of a served role's servers (``kind``: ``teacher`` or ``reference``)."""
    from megatron_gopd.rollout.protocol import ServerAuth

    env = os.environ if environ is None else environ
    return ServerAuth(env.get(TEACHER_KEY_ENV if kind == "teacher" else REF_KEY_ENV) or None)


class ServedRoles:
    """The served teachers or references of a run: ``key -> URLs``, one client each (made on the
    ranks that ask, on first use)."""

    def __init__(
        self, kind: str, urls: dict[str, tuple[str, ...]], cfg: ServedConfig, progress: bool
    ):
        self.kind, self.urls, self.cfg, self.progress = kind, dict(urls), cfg, progress
        self._clients: dict = {}

    def __bool__(self) -> bool:
        return bool(self.urls)

    def _client(self, key: str):
        from megatron_gopd.rollout import ClientConfig, RolloutClient

        if key not in self._clients:
            self._clients[key] = RolloutClient(
                list(self.urls[key]),
                ClientConfig(
                    max_in_flight_per_server=self.cfg.served_max_in_flight,
                    request_timeout_s=self.cfg.served_timeout_s,
                    progress=self.progress,
                ),
                auth=served_auth(self.kind),
                name=f"{self.kind}:{key}",
            )
        return self._clients[key]

    def check_reachable(self) -> None:
        """Rank 0, before any model is built: every served role has a server that answers
        ``/health`` (dead ones are named and left to the failover)."""
        for key, urls in self.urls.items():
            health = self._client(key).health(list(urls))
            dead = [u for u, ok in health.items() if not ok]
            flag_ = "--teacher-urls" if self.kind == "teacher" else "--ref-urls"
            if len(dead) == len(urls):
                raise GopdError(
                    f"{flag_}: no server of the {self.kind} {key!r} answers /health "
                    f"({', '.join(urls)}): start them first (see README, 'Serving the teacher')"
                )
            if dead:
                log.warning(
                    "%s %s: %d of %d servers do not answer /health (%s); scoring fails over to "
                    "the others",
                    self.kind,
                    key,
                    len(dead),
                    len(urls),
                    ", ".join(dead),
                )

    def score(self, groups: dict[str, list[Sample]]) -> dict[str, list[torch.Tensor]]:
        """Collective over all ranks. ``groups``: this rank's samples per served key (the same
        on every rank of a model-parallel group). Returns each sample's response log-probs
        (fp32), on every rank."""
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        leader = parallel.first_rank(group)
        out, error = None, None
        if parallel.rank() == leader:
            out = {}
            try:
                for key in sorted(groups):
                    out[key] = self._score_one(key, groups[key])
            except GopdError as e:
                out, error = None, str(e)
        parallel.raise_any_rank_error(error)
        out = parallel.broadcast_object(out, src=leader, group=group)
        return {k: [torch.tensor(v, dtype=torch.float32) for v in vs] for k, vs in out.items()}

    def _score_one(self, key: str, samples: list[Sample]) -> list[list[float]]:
        if not samples:
            return []
        client = self._client(key)
        lps = client.score(
            [s.tokens for s in samples],
            first=[len(s.prompt_ids) for s in samples],
            per_request=self.cfg.served_sequences_per_request,
            names=[
                f"sample {s.sample_index} of prompt {s.prompt_index} (domain {s.domain})"
                for s in samples
            ],
        )
        rep = client.last_report
        if rep.failovers or rep.dead_servers:
            log.warning("%s %s scoring: %s", self.kind, key, rep.summary())
        return lps
