"""The trainer's side of rollouts: start or attach servers, sample, push weights, shut down.

Binds :mod:`megatron_gopd.rollout` (client, launcher) and :mod:`megatron_gopd.sync` (weight push)
to a :class:`RolloutConfig`. Only global rank 0 talks HTTP; weight pushes are collective (every
rank contributes its shards).

Launched servers (``--rollout-engine sglang|cpu``) need a Hugging Face directory to start from: the
student's weights *as the trainer holds them* (initial or resumed) are exported to
``SAVE/rollout/init_hf`` first (collective gather, rank 0 writes), so a resumed run's servers start
from the resumed weights. Attached servers (``external``) get those weights by the first push.
Without ``--save`` the rollout files go to a temporary directory (``TMPDIR``), removed at the end,
never into the current directory.

**Which transport** (``--weight-sync auto``): colocated servers (``--rollout-colocate``) share GPUs
with trainer ranks, and NCCL refuses two ranks of one communicator on one GPU, so they take the
CUDA IPC path (``tensor``; each server TP rank reads a handle made by the trainer rank on its own
GPU); servers with GPUs of their own take ``distributed`` (an NCCL broadcast from trainer rank 0,
at an address the servers can route to). ``disk`` is the fallback for either.

**Keys**: servers the trainer launches get a fresh random API key (only rank 0 needs it); attached
servers' keys come from ``GOPD_ROLLOUT_API_KEY`` / ``GOPD_ROLLOUT_ADMIN_API_KEY`` (the Slurm launcher
sets the first). Keys never go into the config, the logs or a command line.

**Colocated memory**, per step (slime's order)::

    rollout:  trainer offloaded (trainer.offload)  | servers hold weights, KV cache, CUDA graphs
    after:    servers release all three            | trainer onloaded: scoring, update
    push:     servers resume weights only          | trainer sends the new weights
    rollout:  trainer offloaded, servers resume KV cache + CUDA graphs (only what was released)
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
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
        1.0,
        name="--rollout-temperature",
        help="sampling temperature T (the paper: 1.0); the student is trained, and the teacher "
        "and reference scored, on softmax(logits / T)",
    )
    top_p: float = flag(
        1.0,
        name="--rollout-top-p",
        help="nucleus sampling mass; training refuses anything but 1 (samples must come from the "
        "full distribution the trainer scores)",
    )
    top_k: int = flag(
        -1,
        name="--rollout-top-k",
        help="sample among the k likeliest; training refuses anything but -1 (off)",
    )
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
    prompts_per_request: int = flag(
        1,
        name="--rollout-prompts-per-request",
        help="prompts per /generate request (each of their samples is its own batch entry with "
        "its own rid, as with one); more amortises per-request HTTP work, which dominates "
        "with tiny models (the CPU server), at the price of coarser load balancing and retries",
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
    weight_sync: Literal["auto", "tensor", "distributed", "disk"] = flag(
        "auto",
        help="how student weights reach the rollout servers after each update: tensor (CUDA "
        "IPC, colocated servers), distributed (NCCL broadcast, servers on GPUs of their own), "
        "disk (an HF export on a shared file system); auto: tensor with --rollout-colocate, "
        "else distributed",
    )
    weight_sync_bucket_mb: int = flag(512, help="MiB of weights per transfer")
    weight_sync_check: bool = flag(
        False,
        help="after each push, verify the servers' weights: exact rows where SGLang's model "
        "serves /get_weights_by_name (Llama family), /weights_checker checksums otherwise "
        "(servers agree, and changed exactly when the trainer's weights did)",
    )
    weight_sync_master_addr: str | None = flag(
        None,
        help="address of trainer rank 0's node that the servers dial for --weight-sync "
        "distributed (IPv4 or IPv6)",
        default_help="this host's address on the route to the servers",
    )
    offload_train: bool = flag(
        True,
        name="--no-offload-train",
        invert=True,
        help="with --rollout-colocate, keep the trainer's parameters, gradients and optimizer "
        "state on the GPU during rollouts (by default they wait in host memory)",
    )

    def __post_init__(self):
        if self.colocate and self.weight_sync == "distributed":
            raise GopdError(
                "--rollout-colocate with --weight-sync distributed: the servers share the "
                "trainer's GPUs, and NCCL refuses two ranks of one communicator on one GPU; "
                "colocated servers take CUDA IPC (--weight-sync tensor, what auto picks)"
            )
        if self.weight_sync == "tensor" and not self.colocate:
            raise GopdError(
                "--weight-sync tensor is the colocated path (CUDA IPC handles open only on the "
                "GPUs of their own node): add --rollout-colocate, or use distributed"
            )

    @property
    def samples_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def weight_sync_transport(self) -> str:
        """The transport ``--weight-sync`` resolves to."""
        if self.weight_sync != "auto":
            return self.weight_sync
        return "tensor" if self.colocate else "distributed"


class RolloutSide:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.servers = None
        self.client = None
        self.syncer = None
        self.version = None
        self.auth = None  # rank 0: the servers' keys
        self.offloader = None  # colocated: the trainer's memory around rollouts
        # colocated: the servers' weights were released since the last push (resumed without a
        # CPU backup they are garbage, so the next rollout needs a push first); every rank knows
        self._weights_released = False
        r = cfg.rollout
        self._workdir: Path | None = None
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

    @property
    def workdir(self) -> Path:
        """``SAVE/rollout``; without ``--save`` a temporary directory, made on first use and
        removed at the end (only global rank 0 writes rollout files)."""
        if self._workdir is None:
            if self.cfg.run_dir is not None:
                self._workdir = self.cfg.run_dir / "rollout"
            elif parallel.is_rank0():
                self._workdir = Path(tempfile.mkdtemp(prefix="gopd-rollout-"))
                atexit.register(shutil.rmtree, self._workdir, ignore_errors=True)
                log.info("no --save: rollout files go to %s (removed at the end)", self._workdir)
            else:
                self._workdir = Path(tempfile.gettempdir()) / "gopd-rollout-of-rank-0"
        return self._workdir

    @property
    def colocated(self) -> bool:
        return self.cfg.rollout.colocate

    def attach_trainer(self, offloader) -> None:
        """The trainer's :class:`~megatron_gopd.trainer.offload.TrainOffloader` (colocated runs):
        its memory goes to the host while the servers sample."""
        self.offloader = offloader

    @staticmethod
    def _on_rank0(fn) -> None:
        """Run ``fn`` on rank 0; its :class:`GopdError` is raised on every rank (collective)."""
        error = None
        if parallel.is_rank0():
            try:
                fn()
            except GopdError as e:
                error = str(e)
        parallel.raise_rank0_error(error)

    # ------------------------------------------------------------------ lifecycle

    def check_reachable(self) -> None:
        """Before any model is built: attached servers answer (and take our keys), and the
        colocated layout fits the job (rank 0 asks, all raise)."""
        from megatron_gopd.rollout import RolloutServers, ServerAuth, ServerLaunchConfig

        r = self.cfg.rollout

        def check():
            if r.engine == "external":
                self.auth = ServerAuth.from_env()
                self.servers = RolloutServers(
                    ServerLaunchConfig(backend="attach", urls=r.urls, auth=self.auth)
                ).start()
                tp = [self.servers.tp_size(u) for u in self.servers.urls]
            else:
                import secrets

                # servers we start take a key nobody else knows (unless the user set one); hex:
                # SGLang's --config turns it into "--api-key KEY", where a leading "-" would not parse
                self.auth = ServerAuth.from_env() or ServerAuth(secrets.token_hex(24))
                tp = [r.sglang_tp_size] * r.num_servers
            self._check_layout(tp)

        self._on_rank0(check)
        # colocated servers hold GPU memory from their launch: free it before models are built
        if self.colocated and r.engine == "external":
            self._on_rank0(lambda: self._client().release_memory())

    def _check_layout(self, tp: list[int]) -> None:
        """Colocated servers must each sit on trainer GPUs (see :class:`TensorLayout`)."""
        import os

        if self.cfg.rollout.weight_sync_transport != "tensor":
            return
        from megatron_gopd import platform
        from megatron_gopd.sync.wire import sglang_serializer

        if platform.cuda_available() and sglang_serializer() is None:
            raise GopdError(
                "--weight-sync tensor needs the sglang package in the trainer's environment: its "
                "serializer puts the GPU's UUID into CUDA IPC handles, which SGLang needs to open "
                "them on the right device (pip install -e '.[gpu]')"
            )
        world = parallel.world_size()
        if self.cfg.rollout.engine == "external":
            if sum(tp) != world:
                raise GopdError(
                    f"--rollout-colocate: the {len(tp)} server(s) have {sum(tp)} GPU(s) in all, the "
                    f"trainer {world} rank(s); colocated servers must cover the trainer's GPUs, "
                    "listed in rank order (node by node, GPU by GPU), so that each server TP rank "
                    "gets its CUDA IPC handle from the trainer rank on its GPU"
                )
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            first = self.cfg.rollout.sglang_base_gpu_id
            if first + sum(tp) > local:
                raise GopdError(
                    f"--rollout-colocate: {len(tp)} server(s) of --sglang-tp-size {tp[0]} from GPU "
                    f"{first} need GPUs {first}..{first + sum(tp) - 1} of rank 0's node, which has "
                    f"{local} trainer rank(s)"
                )

    def _client(self):
        from megatron_gopd.rollout import ClientConfig, RolloutClient

        if self.client is None:
            r = self.cfg.rollout
            self.client = RolloutClient(
                lambda: self.servers.urls,
                ClientConfig(
                    max_in_flight_per_server=r.max_in_flight,
                    prompts_per_request=r.prompts_per_request,
                    request_timeout_s=r.timeout_s,
                    progress=self.cfg.log.progress,
                ),
                replace_server=self.servers.replace if r.engine != "external" else None,
                generate_url=self.servers.generate_url,
                auth=self.auth,
            )
        return self.client

    def _launch(self, role) -> None:
        """Export the student and start servers on it (engines that launch their own)."""
        from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig
        from megatron_gopd.sync.export import export_role_to_hf

        r = self.cfg.rollout
        hf_dir = self.workdir / "init_hf"
        export_role_to_hf(role, hf_dir, tokenizer=self.tokenizer)
        if self.colocated and self.offloader is not None:
            self.offloader.offload()  # the servers allocate their share of the GPUs at start
            parallel.barrier()

        def launch():
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
                    # the trainer's log-probs come from fp32 logits: so do the engine's
                    fp32_lm_head=True,
                    log_dir=str(self.workdir / "logs"),
                    auth=self.auth,
                )
            ).start()
            if self.colocated:
                self._client().release_memory()

        self._on_rank0(launch)
        self._weights_released = self.colocated
        if self.colocated and self.offloader is not None:
            parallel.barrier()
            self.offloader.onload()

    def _connect(self) -> None:
        from megatron_gopd.sync import SyncConfig, WeightSyncer

        r = self.cfg.rollout
        rank0 = parallel.is_rank0()
        if rank0:
            self._client()
        self.syncer = WeightSyncer(
            SyncConfig(
                transport=r.weight_sync_transport,
                bucket_bytes=r.weight_sync_bucket_mb * 1024**2,
                disk_dir=str(self.workdir / "weights"),
                check=r.weight_sync_check,
                master_address=r.weight_sync_master_addr,
                tensor_offset=r.sglang_base_gpu_id if r.engine != "external" else 0,
            ),
            (lambda: self.servers.urls) if rank0 else (lambda: []),
            tp_size_of=self.servers.tp_size if rank0 else None,
            features_of=self.servers.features if rank0 else None,
            auth=self.auth,
        )

    def push_weights(self, role) -> None:
        """Collective. The first call starts (or reaches) the servers; every call pushes."""
        if self.syncer is None:
            if self.cfg.rollout.engine != "external":
                self._launch(role)
            self._connect()
        if self.colocated:  # the weights' memory only: the KV cache waits for the rollout
            self._on_rank0(lambda: self.client.resume_memory(["weights"]))
        # samples are only taken from servers holding this version (see RolloutClient.sample)
        self.version = self.syncer.push(role).version
        self._weights_released = False

    # ------------------------------------------------------------------ colocated GPUs

    @contextlib.contextmanager
    def serving(self, role):
        """Collective, around every rollout of ``role`` (the student). Colocated: the trainer's
        memory goes to the host and the servers take back what they released (KV cache, CUDA
        graphs); afterwards the servers release everything and the trainer comes back. Released
        weights come back by a push (after an evaluation, the next rollout pushes again: SGLang
        resumes released weights as uninitialised memory)."""
        if not self.colocated:
            yield
            return
        if self._weights_released:
            self.push_weights(role)
        if self.offloader is not None:
            self.offloader.offload()
        parallel.barrier()  # every GPU is free before the servers take it back

        from megatron_gopd.rollout.protocol import MEMORY_TAGS

        self._on_rank0(lambda: self.client.resume_memory(MEMORY_TAGS))
        try:
            yield
        finally:
            self._on_rank0(lambda: self.client.release_memory())
            self._weights_released = True
            parallel.barrier()
            if self.offloader is not None:
                self.offloader.onload()

    # ------------------------------------------------------------------ sampling

    def sample(
        self, prompts: list[Prompt], *, n: int, seed: int, temperature: float | None = None
    ) -> list[Sample]:
        """Rank 0 only: ``n`` responses per prompt, each with its own sampling seed (honoured by
        SGLang with ``--sglang-enable-deterministic-inference``)."""
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
        if self.cfg.run_dir is None and self._workdir is not None and parallel.is_rank0():
            shutil.rmtree(self._workdir, ignore_errors=True)


def make_rollout(cfg, tokenizer) -> RolloutSide:
    return RolloutSide(cfg, tokenizer)
