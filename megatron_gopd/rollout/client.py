"""Rollouts through SGLang's native HTTP API: many requests, several servers, faults survived.

The trainer calls :meth:`RolloutClient.sample` once per step::

    client = RolloutClient(pool.urls, ClientConfig(), replace_server=pool.replace)
    samples = client.sample(prompts, n=8, sampling=SamplingConfig(temperature=1.0))
    print(client.last_report.summary())

and gets :class:`~megatron_gopd.types.Sample` objects (response ids, the server's log-probs of
them, finish reason, prompt/sample index). Prefill scoring (``max_new_tokens: 0``,
``logprob_start_len``; served teachers and references use it) is :meth:`RolloutClient.score`.

How requests flow:

* One HTTP request ("job") per ``prompts_per_request`` prompts, with each of their n samples as
  its own batch entry under its own request id (``rid``), never ``sampling_params.n``: SGLang
  gives the children of an ``n > 1`` request random rids that nobody can abort (it aborts exact
  rids only), and seeds by (seed, position), so n children sharing one ``sampling_seed`` would be
  identical; each entry gets its own seed. A retry sends fresh rids (the old ones may still run).
* A rollout that stops before the end (an error, a cancel) aborts the rids it still has in
  flight, so the servers do not go on generating for nobody.
* Jobs go to the live server with the fewest jobs in flight, at most ``max_in_flight_per_server``
  each; SGLang batches across requests itself, so the bound only limits queueing and memory.
* Transient failures (HTTP 5xx, a dropped keep-alive connection, a timeout) are retried with
  exponential backoff on the same server while its ``/health`` answers. A server whose
  ``/health`` does not answer is dead: its unfinished jobs go back to the queue and run on the
  remaining servers, and ``replace_server`` (the launcher's restart) may bring a new one. With no
  live server left and none coming back, :class:`RolloutError` says so. Everything is counted in
  :class:`RolloutReport`.
* A 4xx answer or a malformed response is not retried: it is our bug or a schema mismatch, and
  the error names the server and the request.
* Prompts longer than the context budget (``context_length - max_new_tokens``) are skipped and
  counted, with one warning per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_gopd.rollout.protocol import (
    MEMORY_TAGS,
    GenerateOutput,
    ProtocolError,
    RequestError,
    SamplingConfig,
    ServerAuth,
    http_json,
    parse_generate_output,
)
from megatron_gopd.types import Sample
from megatron_gopd.utils import GopdError, get_logger

__all__ = [
    "ClientConfig",
    "RolloutClient",
    "RolloutError",
    "RolloutPrompt",
    "RolloutReport",
]

log = get_logger(__name__)


class RolloutError(GopdError):
    """The rollout cannot complete (no server left, or a request keeps failing)."""


class _ServerDown(Exception):
    """Move the job elsewhere: the server is dead, or (``stale``) alive with other weights."""

    def __init__(self, server: _Server, cause: str, stale: bool = False):
        super().__init__(cause)
        self.server, self.cause, self.stale = server, cause, stale


@dataclass(frozen=True)
class ClientConfig:
    max_in_flight_per_server: int = 64
    prompts_per_request: int = 1
    request_timeout_s: float = 3600.0
    connect_timeout_s: float = 10.0
    health_timeout_s: float = 10.0
    max_retries: int = 3  # per job, for transient errors on a server that is still healthy
    backoff_s: float = 0.5
    backoff_max_s: float = 15.0
    # None: ask the first server (/server_info); prompts over the budget are skipped
    context_length: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.max_in_flight_per_server < 1 or self.prompts_per_request < 1:
            raise GopdError("max_in_flight_per_server and prompts_per_request must be >= 1")


@dataclass(frozen=True)
class RolloutPrompt:
    """A prompt of the dataset: its token ids, domain, dataset fields and index."""

    prompt_ids: list[int]
    domain: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_index: int = 0


@dataclass
class RolloutReport:
    requests: int = 0
    responses: int = 0
    tokens: int = 0
    retries: int = 0
    failovers: int = 0  # jobs moved to another server after theirs died
    skipped_too_long: int = 0
    aborted: int = 0
    dead_servers: list[str] = field(default_factory=list)
    # alive but serving another weight version than asked for (e.g. restarted since the last push)
    stale_servers: list[str] = field(default_factory=list)
    restarted_servers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        s = (
            f"{self.responses} responses, {self.tokens} tokens in {self.seconds:.1f}s "
            f"({self.requests} requests, {self.retries} retries"
        )
        if self.failovers or self.dead_servers:
            s += f", {self.failovers} moved off dead servers {self.dead_servers}"
        if self.restarted_servers:
            s += f", restarted as {self.restarted_servers}"
        if self.stale_servers:
            s += f", stale weights on {self.stale_servers}"
        if self.skipped_too_long:
            s += f", {self.skipped_too_long} prompts skipped as too long"
        if self.aborted:
            s += f", {self.aborted} aborted"
        return s + ")"


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    alive: bool = True


@dataclass
class _Job:
    index: int
    rid: str
    payload: dict[str, Any]
    n_items: int
    want_logprobs: bool
    weight_version: str | None = None
    attempts: int = 0
    outputs: list[GenerateOutput] | None = None
    # the rids of the attempt in flight: one per batch entry (a single request: one)
    rids: list[str] = field(default_factory=list)

    def next_attempt(self) -> dict[str, Any]:
        """The payload of the next attempt, under fresh rids (SGLang refuses a rid that is still
        in flight, and the previous attempt's may be)."""
        self.attempts += 1
        base = f"{self.rid}-a{self.attempts}" if self.attempts > 1 else self.rid
        if isinstance(self.payload["input_ids"][0], list):
            self.rids = [f"{base}-{k}" for k in range(len(self.payload["input_ids"]))]
            return {**self.payload, "rid": self.rids}
        self.rids = [base]
        return {**self.payload, "rid": base}


class RolloutClient:
    """Client of one or more SGLang (or CPU stand-in) servers; see the module docstring.

    ``urls``: the servers, or a callable returning the current list (e.g.
    ``lambda: servers.urls``, so that a restarted server is used by later calls).
    ``generate_url``: where generation goes instead, e.g. an sglang-router in front of ``urls``
    (then failover is the router's). ``replace_server(dead_url) -> new_url | None``: called in a
    thread when a server died (``RolloutServers.replace``). ``auth``: the servers' API keys
    (``Authorization: Bearer``; the admin key to admin endpoints). ``last_report`` is live while a
    call runs.
    """

    def __init__(
        self,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        config: ClientConfig | None = None,
        *,
        replace_server: Callable[[str], str | None] | None = None,
        generate_url: str | None = None,
        auth: ServerAuth | None = None,
        name: str = "rollout",
    ):
        self._urls = urls
        self.name = name  # what the servers serve, for messages ("rollout", "teacher:math", ...)
        if not self.urls and not generate_url:
            raise GopdError(f"the {name} client needs at least one server URL")
        self.config = config or ClientConfig()
        self.auth = auth or ServerAuth()
        self._released: dict[str, set[str]] = {}  # url -> memory tags released there
        self.replace_server = replace_server
        self.generate_url = generate_url.rstrip("/") if generate_url else None
        self.last_report = RolloutReport()
        self._context_length = self.config.context_length

    @property
    def urls(self) -> list[str]:
        urls = self._urls() if callable(self._urls) else self._urls
        return [u.rstrip("/") for u in urls]

    # ------------------------------------------------------------------ high level

    def sample(
        self,
        prompts: Sequence[RolloutPrompt | tuple],
        n: int,
        sampling: SamplingConfig,
        *,
        weight_version: str | None = None,
    ) -> list[Sample]:
        """``n`` samples of every prompt, as :class:`Sample` objects in prompt order.

        ``prompts``: :class:`RolloutPrompt` or ``(prompt_ids, domain, metadata, prompt_index)``.
        Prompts over the context budget yield no samples (counted in ``last_report``).
        ``weight_version``: the version of the last weight push (``WeightSyncer.push(version=)``);
        answers from a server with another version (one restarted since, with the launch
        weights) are not used: the server is left out of this rollout and the request goes
        elsewhere, so no off-policy sample slips in.
        """
        return _run(self.asample(prompts, n, sampling, weight_version=weight_version))

    async def asample(
        self,
        prompts: Sequence[RolloutPrompt | tuple],
        n: int,
        sampling: SamplingConfig,
        *,
        weight_version: str | None = None,
    ) -> list[Sample]:
        if n < 1:
            raise GopdError(f"n must be >= 1, got {n}")
        specs = [p if isinstance(p, RolloutPrompt) else RolloutPrompt(*p) for p in prompts]
        report = self.last_report = RolloutReport()
        budget = self._prompt_budget(sampling.max_new_tokens)
        kept = []
        for p in specs:
            if not p.prompt_ids:
                raise GopdError(f"prompt {p.prompt_index} is empty")
            if budget is not None and len(p.prompt_ids) > budget:
                report.skipped_too_long += 1
            else:
                kept.append(p)
        if report.skipped_too_long:
            log.warning(
                "skipped %d of %d prompts longer than the context budget of %d tokens "
                "(context length %d - max_new_tokens %d)",
                report.skipped_too_long,
                len(specs),
                budget,
                self._context_length,
                sampling.max_new_tokens,
            )
        groups = [
            kept[a : a + self.config.prompts_per_request]
            for a in range(0, len(kept), self.config.prompts_per_request)
        ]
        jobs = [self._sample_job(i, g, n, sampling) for i, g in enumerate(groups)]
        for job in jobs:
            job.weight_version = weight_version
        await self._run_jobs(jobs, report, total=len(kept) * n, desc="rollout")
        samples: list[Sample] = []
        for g, job in zip(groups, jobs):
            outs = iter(job.outputs or [])
            for p in g:
                for j in range(n):
                    o = next(outs)
                    report.aborted += o.finish_reason == "abort"
                    samples.append(
                        Sample(
                            prompt_ids=list(p.prompt_ids),
                            response_ids=o.output_ids,
                            domain=p.domain,
                            prompt_index=p.prompt_index,
                            sample_index=j,
                            finish_reason=o.finish_reason,
                            rollout_logprobs_T=o.output_logprobs,
                            metadata=dict(p.metadata),
                        )
                    )
        return samples

    def _sample_job(
        self, index: int, group: list[RolloutPrompt], n: int, sampling: SamplingConfig
    ) -> _Job:
        rid = f"gopd-{uuid.uuid4().hex[:12]}-{index}"
        entries = [(p, j) for p in group for j in range(n)]
        payload: dict[str, Any] = {
            "input_ids": [list(p.prompt_ids) for p, _ in entries],
            "sampling_params": [
                sampling.to_sglang(n=1, sampling_seed=sampling.sample_seed(p.prompt_index, j))
                for p, j in entries
            ],
            "return_logprob": True,
        }
        return _Job(index, rid, payload, n_items=len(entries), want_logprobs=True)

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        first: Sequence[int] | None = None,
        per_request: int = 1,
        names: Sequence[str] | None = None,
    ) -> list[list[float]]:
        """Prefill scoring: the server's log-probs ``log p(s[t] | s[:t])`` of the tokens
        ``s[first:]`` of each sequence ``s`` (``first`` defaults to 1: every token after the
        first), ``len(s) - first`` values each, never tempered (SGLang's prompt log-probs are
        ``log_softmax`` of the raw logits).

        One ``/generate`` per ``per_request`` sequences (``max_new_tokens: 0``,
        ``return_logprob``, ``logprob_start_len = first - 1``), bounded in flight, retried and
        failed over like :meth:`sample`. SGLang answers ``len(s) - first + 1`` entries for the
        tokens ``s[first - 1:]``, the first always null (its predicting position is not
        computed): it is checked and dropped. A wrong count is an error naming the sequence
        (``names[i]``, default ``sequence i``).
        """
        return _run(self.ascore(sequences, first=first, per_request=per_request, names=names))

    async def ascore(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        first: Sequence[int] | None = None,
        per_request: int = 1,
        names: Sequence[str] | None = None,
    ) -> list[list[float]]:
        firsts = [1] * len(sequences) if first is None else [int(f) for f in first]
        labels = (
            list(names) if names is not None else [f"sequence {i}" for i in range(len(sequences))]
        )
        if len(firsts) != len(sequences) or len(labels) != len(sequences):
            raise GopdError("score: first and names must have one entry per sequence")
        if per_request < 1:
            raise GopdError(f"score: per_request must be >= 1, got {per_request}")
        for s, f, label in zip(sequences, firsts, labels):
            if not 1 <= f < len(s):
                raise GopdError(
                    f"{label}: cannot score tokens from position {f} of a {len(s)}-token sequence"
                )
        groups = [
            list(range(a, min(a + per_request, len(sequences))))
            for a in range(0, len(sequences), per_request)
        ]
        jobs = []
        for j, g in enumerate(groups):
            payload = {
                "input_ids": [list(sequences[i]) for i in g],
                "sampling_params": [{"max_new_tokens": 0, "temperature": 1.0} for _ in g],
                "return_logprob": True,
                "logprob_start_len": [firsts[i] - 1 for i in g],
            }
            rid = f"gopd-score-{uuid.uuid4().hex[:12]}-{j}"
            jobs.append(_Job(j, rid, payload, n_items=len(g), want_logprobs=True))
        report = self.last_report = RolloutReport()
        await self._run_jobs(jobs, report, total=len(sequences), desc=f"{self.name} scoring")
        out: list[list[float]] = [[] for _ in sequences]
        for g, job in zip(groups, jobs):
            for i, o in zip(g, job.outputs or []):
                out[i] = _scored(o, sequences[i], firsts[i], f"{labels[i]} (request {job.rid})")
        return out

    # ------------------------------------------------------------------ job engine

    def _prompt_budget(self, max_new_tokens: int) -> int | None:
        if self._context_length is None:
            with contextlib.suppress(Exception):
                info = self.server_info(self.urls[0])
                if isinstance(info.get("context_length"), int):
                    self._context_length = info["context_length"]
        if self._context_length is None:
            return None
        return max(self._context_length - max_new_tokens, 0)

    async def _run_jobs(
        self, jobs: list[_Job], report: RolloutReport, *, total: int, desc: str
    ) -> None:
        import aiohttp

        t0 = time.monotonic()
        servers = (
            [_Server(self.generate_url)] if self.generate_url else [_Server(u) for u in self.urls]
        )
        bar = None
        if self.config.progress and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="resp", leave=False, dynamic_ncols=True)
        timeout = aiohttp.ClientTimeout(
            total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
        )
        pending = deque(jobs)
        running: dict[asyncio.Task, tuple[_Job, _Server]] = {}
        restarts: set[asyncio.Task] = set()
        last_error = ""
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            try:
                while pending or running:
                    while pending:
                        live = [s for s in servers if s.alive]
                        s = min(live, key=lambda x: x.in_flight, default=None)
                        if s is None or s.in_flight >= self.config.max_in_flight_per_server:
                            break
                        job = pending.popleft()
                        s.in_flight += 1
                        report.requests += 1
                        task = asyncio.create_task(self._do_job(session, s, job, report))
                        running[task] = (job, s)
                    if not running and not restarts:
                        why = []
                        if report.dead_servers:
                            why.append(
                                f"{len(report.dead_servers)} died "
                                f"({', '.join(report.dead_servers)}) and none came back"
                            )
                        if report.stale_servers:
                            why.append(
                                f"{len(report.stale_servers)} serve stale weights "
                                f"({', '.join(report.stale_servers)}): push the weights first"
                            )
                        raise RolloutError(
                            f"no {self.name} server left: {'; '.join(why)}; {len(pending)} of "
                            f"{len(jobs)} requests unfinished (last error: {last_error})"
                        )
                    done, _ = await asyncio.wait(
                        [*running, *restarts], return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in done:
                        if t in restarts:
                            restarts.discard(t)
                            new = t.result() if t.exception() is None else None
                            if t.exception() is not None:
                                log.warning("restarting a rollout server failed: %s", t.exception())
                            if new:
                                servers.append(_Server(new.rstrip("/")))
                                report.restarted_servers.append(new)
                                log.warning("rollout server %s is back", new)
                            continue
                        job, s = running.pop(t)
                        s.in_flight -= 1
                        exc = (
                            _ServerDown(s, "cancelled: server marked dead")
                            if t.cancelled()
                            else t.exception()
                        )
                        if exc is None:
                            if bar is not None:
                                bar.update(job.n_items)
                                bar.set_postfix(tokens=report.tokens, refresh=False)
                            continue
                        if not isinstance(exc, _ServerDown):
                            raise exc
                        last_error = f"{exc.server.url}: {exc.cause}"
                        pending.appendleft(job)
                        report.failovers += 1
                        if s.alive and exc.stale:
                            s.alive = False
                            report.stale_servers.append(s.url)
                            log.warning("leaving %s out of this rollout: %s", s.url, exc.cause)
                        elif s.alive:
                            s.alive = False
                            report.dead_servers.append(s.url)
                            log.warning(
                                "%s server %s is down (%s): moving its unfinished requests "
                                "to %d other server(s)",
                                self.name,
                                s.url,
                                exc.cause,
                                sum(x.alive for x in servers),
                            )
                            # its other jobs would only hang until their timeout
                            for other, (_, srv) in running.items():
                                if srv is s:
                                    other.cancel()
                            if self.replace_server is not None and not self.generate_url:
                                restarts.add(
                                    asyncio.create_task(
                                        asyncio.to_thread(self.replace_server, s.url)
                                    )
                                )
            except BaseException:
                for t in [*running, *restarts]:
                    t.cancel()
                await asyncio.gather(*running, *restarts, return_exceptions=True)
                await self._abort_quietly(session, running)
                raise
            finally:
                if bar is not None:
                    bar.close()
                report.seconds = time.monotonic() - t0
        if report.dead_servers:
            log.warning("rollout recovered: %s", report.summary())

    async def _abort_quietly(self, session, running) -> None:
        """Abort the exact rids of the requests still in flight (SGLang matches no prefixes)."""
        calls = []
        for job, s in list(running.values()):
            if s.alive:
                for rid in job.rids:
                    calls.append(
                        self._post_quietly(session, f"{s.url}/abort_request", {"rid": rid})
                    )
        await asyncio.gather(*calls)

    async def _post_quietly(self, session, url: str, payload: dict) -> None:
        import aiohttp

        with contextlib.suppress(Exception):
            async with session.post(
                url,
                json=payload,
                headers=self.auth.headers(url),
                timeout=aiohttp.ClientTimeout(total=2),
            ):
                pass

    async def _do_job(self, session, server: _Server, job: _Job, report: RolloutReport) -> None:
        """Run one job on one server; raise _ServerDown to move it elsewhere."""
        import aiohttp

        cfg = self.config
        where = f"server {server.url}, request {job.rid}"
        while True:
            payload = job.next_attempt()
            try:
                async with session.post(
                    f"{server.url}/generate",
                    json=payload,
                    headers=self.auth.headers("/generate"),
                ) as r:
                    status = r.status
                    text = await r.text()
            except asyncio.CancelledError:
                raise _ServerDown(server, "cancelled: server marked dead") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                cause = f"{type(e).__name__}: {e}".rstrip(": ")
                if not await self._healthy(session, server):
                    raise _ServerDown(server, cause) from None
                problem = cause
            else:
                if status == 200:
                    outs = self._parse(text, where, job)
                    if any(o.finish_reason == "abort" for o in outs) and (
                        job.attempts <= cfg.max_retries
                    ):
                        problem = "aborted by the server"
                    else:
                        got = {o.weight_version for o in outs}
                        if job.weight_version is not None and got != {job.weight_version}:
                            raise _ServerDown(
                                server,
                                f"serves weight version {sorted(map(str, got))}, "
                                f"expected {job.weight_version!r}",
                                stale=True,
                            )
                        job.outputs = outs
                        report.responses += len(outs)
                        report.tokens += sum(len(o.output_ids) for o in outs)
                        return
                elif 400 <= status < 500:
                    raise RequestError(
                        f"{where} was refused (HTTP {status}): {text[:500]}", status, text
                    )
                else:
                    problem = f"HTTP {status}: {text[:200]}"
            if job.attempts > cfg.max_retries:
                raise _ServerDown(server, f"{problem} ({job.attempts} attempts)")
            report.retries += 1
            delay = min(cfg.backoff_s * 2 ** (job.attempts - 1), cfg.backoff_max_s)
            log.info("%s: %s; retrying in %.1fs", where, problem, delay)
            await asyncio.sleep(delay)

    def _parse(self, text: str, where: str, job: _Job) -> list[GenerateOutput]:
        import json

        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            raise ProtocolError(
                f"malformed /generate response from {where}: not JSON: {text[:200]!r}"
            ) from None
        items = body if isinstance(body, list) else [body]
        if len(items) != job.n_items:
            raise ProtocolError(
                f"malformed /generate response from {where}: {len(items)} items for "
                f"{job.n_items} requested samples"
            )
        return [
            parse_generate_output(it, where=where, want_logprobs=job.want_logprobs) for it in items
        ]

    async def _healthy(self, session, server: _Server) -> bool:
        import aiohttp

        try:
            async with session.get(
                f"{server.url}/health",
                timeout=aiohttp.ClientTimeout(total=self.config.health_timeout_s),
            ) as r:
                return r.status == 200
        except Exception:
            return False

    # ------------------------------------------------------------------ admin

    def _all(self, urls: Sequence[str] | None) -> list[str]:
        return list(urls) if urls is not None else list(self.urls)

    def server_info(self, url: str) -> dict[str, Any]:
        """``/server_info`` (``/get_server_info`` on SGLang < 0.5.6). It holds the server's
        arguments, its API keys included: do not log it."""
        from megatron_gopd.rollout.launcher import server_info

        try:
            return server_info(url, self.auth, timeout=self.config.health_timeout_s)
        except GopdError as e:
            raise RolloutError(str(e)) from None

    def health(self, urls: Sequence[str] | None = None, generate: bool = False) -> dict[str, bool]:
        path = "/health_generate" if generate else "/health"
        out = {}
        for u in self._all(urls):
            try:
                out[u] = http_json(u + path, timeout=self.config.health_timeout_s)[0] == 200
            except OSError:
                out[u] = False
        return out

    def flush_cache(self, urls: Sequence[str] | None = None, timeout_s: float = 120.0) -> None:
        """Flush every server's prefix cache, retrying while a server still runs requests
        (SGLang refuses to flush then). Stale KV entries would mix old and new weights."""
        for u in self._all(urls):
            deadline = time.monotonic() + timeout_s
            for attempt in itertools.count():
                status, body = http_json(
                    u + "/flush_cache", method="POST", timeout=timeout_s, auth=self.auth
                )
                if status == 401:
                    raise RolloutError(f"{u}/flush_cache: HTTP 401 (wrong or missing API key)")
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RolloutError(
                        f"{u} did not flush its cache within {timeout_s:.0f}s: {str(body)[:200]}"
                    )
                time.sleep(min(0.05 * 2**attempt, 2.0))

    def abort(self, rid: str | None = None, urls: Sequence[str] | None = None) -> None:
        """Abort one request (its exact ``rid``: SGLang matches no prefixes) or, without ``rid``,
        every request."""
        payload = {"rid": rid} if rid else {"abort_all": True}
        for u in self._all(urls):
            self._admin(u, "/abort_request", payload)

    def release_memory(self, tags: Sequence[str] | None = None, urls=None) -> None:
        """Colocated runs: free the servers' GPU memory while the trainer works. ``tags``: any of
        :data:`~megatron_gopd.rollout.protocol.MEMORY_TAGS`; default all three, named explicitly
        (SGLang's default set depends on its version). Needs idle servers."""
        tags = list(tags) if tags else list(MEMORY_TAGS)
        for u in self._all(urls):
            self._admin(u, "/release_memory_occupation", {"tags": tags})
            self._released.setdefault(u, set()).update(tags)

    def resume_memory(self, tags: Sequence[str] | None = None, urls=None) -> None:
        """Take back memory released by :meth:`release_memory`: ``tags``, or everything this
        client released. Only released tags are resumed: SGLang's scheduler raises on a tag it
        did not release."""
        for u in self._all(urls):
            released = self._released.get(u, set())
            want = [t for t in (tags or MEMORY_TAGS) if t in released]
            if want:
                self._admin(u, "/resume_memory_occupation", {"tags": want})
                released.difference_update(want)

    def released_memory(self, url: str) -> set[str]:
        """The tags this client released on ``url`` and has not resumed."""
        return set(self._released.get(url.rstrip("/"), set()))

    def _admin(self, url: str, path: str, payload: Any, timeout: float = 600.0) -> Any:
        try:
            status, body = http_json(url + path, payload, timeout=timeout, auth=self.auth)
        except OSError as e:
            raise RolloutError(f"{url}{path}: server unreachable ({e})") from None
        if status != 200:
            raise RolloutError(f"{url}{path} answered HTTP {status}: {str(body)[:300]}")
        return body


def _scored(o: GenerateOutput, seq: Sequence[int], first: int, label: str) -> list[float]:
    """The log-probs of ``seq[first:]`` from one prefill answer (``logprob_start_len = first -
    1``): ``len(seq) - first + 1`` entries for ``seq[first - 1:]``, the first null. SGLang
    reports a token id ``>= vocab_size - 1`` as 0 (its image-token clipping), so 0 is accepted
    for any token."""
    lps, entries = o.input_logprobs, o.meta.get("input_token_logprobs")
    want = len(seq) - first + 1
    if lps is None or len(lps) != want:
        raise ProtocolError(
            f"prefill scoring of {label}: expected {want} input_token_logprobs for tokens "
            f"{first - 1}..{len(seq) - 1} (the first null), got "
            f"{'none' if lps is None else len(lps)}"
        )
    if lps[0] is not None or any(x is None for x in lps[1:]):
        raise ProtocolError(
            f"prefill scoring of {label}: input_token_logprobs must be null exactly at the first "
            f"entry, got nulls at {[k for k, x in enumerate(lps) if x is None]}"
        )
    ids = [e[1] for e in entries]
    bad = [k for k, (a, b) in enumerate(zip(ids, seq[first - 1 :])) if a not in (b, 0)]
    if bad:
        k = bad[0]
        raise ProtocolError(
            f"prefill scoring of {label}: input_token_logprobs[{k}] is for token {ids[k]}, the "
            f"sequence has {seq[first - 1 + k]} there"
        )
    return [float(x) for x in lps[1:]]


def _run(coro):
    """Run a coroutine from synchronous code (the trainer); refuse inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise GopdError("called from a running event loop: use the async variant (asample / ascore)")
