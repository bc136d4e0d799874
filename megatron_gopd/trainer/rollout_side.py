"""The trainer's side of rollouts: start or attach servers, sample, push weights, shut down.

Binds :mod:`megatron_gopd.rollout` (client, launcher) and :mod:`megatron_gopd.sync` (weight push)
to a :class:`RolloutConfig`. Only global rank 0 talks HTTP; weight pushes are collective (every
rank contributes its shards).

Launched servers (``--rollout-engine sglang|cpu``) need a Hugging Face directory to start from: the
student's weights *as the trainer holds them* (initial or resumed) are exported to
``SAVE/rollout/init_hf`` first (collective gather, rank 0 writes), so a resumed run's servers start
from the resumed weights. Attached servers (``external``) get those weights by the first push.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_gopd import parallel
from megatron_gopd.flags import flag
from megatron_gopd.trainer.data import Prompt
from megatron_gopd.types import Sample
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["RolloutConfig", "RolloutSide", "make_rollout"]

log = get_logger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling, the rollout servers and the weight sync to them."""

    FLAG_GROUP = "rollout"

    rollout_batch_size: int = flag(32, help="prompts per training step")
    n_samples_per_prompt: int = flag(4, help="responses sampled per prompt")
    temperature: float = flag(
        1.0, name="--rollout-temperature", help="sampling temperature (the paper: 1.0)"
    )
    top_p: float = flag(1.0, name="--rollout-top-p", help="nucleus sampling mass (1: off)")
    top_k: int = flag(-1, name="--rollout-top-k", help="sample among the k likeliest (-1: off)")
    max_response_len: int = flag(1024, help="longest response in tokens (longer: truncated)")
    engine: Literal["sglang", "cpu", "external"] = flag(
        "sglang",
        name="--rollout-engine",
        help="sglang: start SGLang servers; cpu: start our protocol-compatible CPU server; "
        "external: attach to --rollout-urls",
    )
    urls: tuple[str, ...] = flag(
        (),
        name="--rollout-urls",
        help="existing servers (or an sglang-router URL) for --rollout-engine external",
    )
    num_servers: int = flag(1, name="--rollout-num-servers", help="servers to launch")
    max_in_flight: int = flag(
        256, name="--rollout-max-in-flight", help="requests in flight per server"
    )
    timeout_s: float = flag(600.0, name="--rollout-timeout", help="seconds per request")
    sglang_tp_size: int = flag(1, help="tensor-parallel GPUs per SGLang server")
    sglang_mem_fraction_static: float = flag(
        0.6, help="share of GPU memory SGLang takes for weights and KV cache"
    )
    sglang_enable_memory_saver: bool = flag(
        False,
        help="launch SGLang with --enable-memory-saver (implied by --rollout-colocate)",
    )
    sglang_enable_deterministic_inference: bool = flag(
        False,
        help="launch SGLang with --enable-deterministic-inference: rollouts reproducible from "
        "--seed (SGLang ignores sampling seeds without it), at a cost in sampling speed and "
        "with fewer attention backends",
    )
    colocate: bool = flag(
        False,
        name="--rollout-colocate",
        help="the rollout servers share the training GPUs: release their memory while the "
        "trainer works, resume it for weight sync and rollouts",
    )
    sglang_base_gpu_id: int = flag(0, help="first GPU of the first server on its node")
    weight_sync: Literal["tensor", "distributed", "disk"] = flag(
        "distributed", help="how student weights reach the rollout servers after each update"
    )
    weight_sync_bucket_mb: int = flag(512, help="MiB of weights per transfer")
    weight_sync_check: bool = flag(
        False, help="after each push, compare the servers' weights with the trainer's"
    )

    @property
    def samples_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt


class RolloutSide:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.servers = None
        self.client = None
        self.syncer = None
        self.version = None
        r = cfg.rollout
        self.workdir = (cfg.run_dir or Path(".")) / "rollout"
        stop = tuple(
            t
            for t in {tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)}
            if t is not None
        )
        from megatron_gopd.rollout import SamplingConfig

        self.sampling = SamplingConfig(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_len,
            stop_token_ids=stop[:1],
        )

    # ------------------------------------------------------------------ lifecycle

    def check_reachable(self) -> None:
        """Attached servers must answer before any model is built (rank 0 asks, all raise)."""
        error = None
        if self.cfg.rollout.engine == "external" and parallel.is_rank0():
            from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig

            try:
                self.servers = RolloutServers(
                    ServerLaunchConfig(backend="attach", urls=self.cfg.rollout.urls)
                ).start()
            except GopdError as e:
                error = str(e)
        parallel.raise_rank0_error(error)
        # colocated servers hold GPU memory from their launch: free it before models are built
        self.release_memory()

    def _launch(self, role) -> None:
        """Export the student and start servers on it (engines that launch their own)."""
        from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig
        from megatron_gopd.sync.export import export_role_to_hf

        r = self.cfg.rollout
        hf_dir = self.workdir / "init_hf"
        export_role_to_hf(role, hf_dir, tokenizer=self.tokenizer)
        error = None
        if parallel.is_rank0():
            try:
                self.servers = RolloutServers(
                    ServerLaunchConfig(
                        backend="sglang" if r.engine == "sglang" else "cpu",
                        model_path=str(hf_dir),
                        num_servers=r.num_servers,
                        tp_size=r.sglang_tp_size,
                        base_gpu_id=r.sglang_base_gpu_id,
                        mem_fraction_static=r.sglang_mem_fraction_static,
                        enable_memory_saver=r.sglang_enable_memory_saver,
                        random_seed=self.cfg.seed,
                        deterministic=r.sglang_enable_deterministic_inference,
                        log_dir=str(self.workdir / "logs"),
                    )
                ).start()
            except GopdError as e:
                error = str(e)
        parallel.raise_rank0_error(error)

    def _connect(self) -> None:
        from megatron_gopd.rollout import ClientConfig, RolloutClient
        from megatron_gopd.sync import SyncConfig, WeightSyncer

        r = self.cfg.rollout
        if parallel.is_rank0():
            self.client = RolloutClient(
                lambda: self.servers.urls,
                ClientConfig(
                    max_in_flight_per_server=r.max_in_flight,
                    request_timeout_s=r.timeout_s,
                    progress=self.cfg.log.progress,
                ),
                replace_server=self.servers.replace if r.engine != "external" else None,
                generate_url=self.servers.generate_url,
            )
        urls = (lambda: self.servers.urls) if parallel.is_rank0() else (lambda: [])
        self.syncer = WeightSyncer(
            SyncConfig(
                transport=r.weight_sync,
                bucket_bytes=r.weight_sync_bucket_mb * 1024**2,
                disk_dir=str(self.workdir / "weights"),
                check=r.weight_sync_check,
            ),
            urls,
            tp_size_of=(self.servers.tp_size if parallel.is_rank0() else None),
        )

    def push_weights(self, role) -> None:
        """Collective. The first call starts (or reaches) the servers; every call pushes."""
        if self.syncer is None:
            if self.cfg.rollout.engine != "external":
                self._launch(role)
            self._connect()
        self._resume_memory(["weights"])
        # samples are only taken from servers holding this version (see RolloutClient.sample)
        self.version = self.syncer.push(role).version
        self._resume_memory(["kv_cache"])

    # ------------------------------------------------------------------ colocated GPUs

    def release_memory(self) -> None:
        """``--rollout-colocate``: the servers free their weights and KV cache while the trainer
        works (SGLang's ``/release_memory_occupation``, with ``--enable-memory-saver``)."""
        if self.cfg.rollout.colocate and parallel.is_rank0() and self.servers is not None:
            from megatron_gopd.rollout import RolloutClient

            (self.client or RolloutClient(self.servers.urls)).release_memory()

    def _resume_memory(self, tags: list[str]) -> None:
        if self.cfg.rollout.colocate and parallel.is_rank0() and self.client is not None:
            self.client.resume_memory(tags)

    # ------------------------------------------------------------------ sampling

    def sample(
        self, prompts: list[Prompt], *, n: int, seed: int, temperature: float | None = None
    ) -> list[Sample]:
        """Rank 0 only: ``n`` responses per prompt with reproducible per-sample seeds."""
        import dataclasses

        from megatron_gopd.rollout import RolloutPrompt

        sampling = dataclasses.replace(self.sampling, seed=seed)
        if temperature is not None:
            sampling = dataclasses.replace(sampling, temperature=temperature)
        specs = [RolloutPrompt(p.prompt_ids, p.domain, p.metadata, p.index) for p in prompts]
        samples = self.client.sample(specs, n, sampling, weight_version=self.version)
        rep = self.client.last_report
        if rep.failovers or rep.dead_servers or rep.skipped_too_long:
            log.warning("rollout: %s", rep.summary())
        return samples

    def shutdown(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
        if self.servers is not None and parallel.is_rank0():
            self.servers.stop()


def make_rollout(cfg, tokenizer) -> RolloutSide:
    return RolloutSide(cfg, tokenizer)
