"""Rollout servers: launch SGLang (or our CPU stand-in), attach to running ones, stop them cleanly.

::

    cfg = ServerLaunchConfig(backend="sglang", model_path=hf_export, num_servers=2, tp_size=4,
                             mem_fraction_static=0.7, enable_memory_saver=True)
    with RolloutServers(cfg) as servers:
        client = RolloutClient(servers.urls, replace_server=servers.replace,
                               generate_url=servers.generate_url)

``backend="sglang"`` runs ``python -m sglang.launch_server`` per server with the flags RL trainers
use (``--tp-size``, ``--base-gpu-id``, ``--mem-fraction-static``, ``--enable-memory-saver``,
``--skip-tokenizer-init``: we send token ids and read token ids). ``backend="cpu"`` runs
``python -m megatron_gopd.cpu_server`` (tests, the tiny demo) with the same flags where it has
them. ``backend="attach"`` uses servers someone else runs (``--rollout-urls``), optionally behind
an sglang-router (``router_url``); ``launch_router=True`` starts ``sglang_router`` in front of
launched servers.

What a launched server gets:

* **A clean environment.** A torchrun worker carries ``TORCHELASTIC_USE_AGENT_STORE=True``,
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... SGLang creates its own process group over
  ``tcp://`` at start-up, and torch's rendezvous, seeing the agent-store flag, connects to a store
  that nobody serves: the server hangs before it is healthy. :func:`server_env` drops every
  variable torchrun sets for its workers (and the allocator settings SGLang's memory saver does
  not support), and each server gets its own ``--nccl-port``.
* **Its keys in a private file.** With ``auth`` set, ``--api-key`` / ``--admin-api-key`` go into a
  ``--config`` YAML file (mode 600; SGLang reads its options from it), not onto the command line,
  which every user of the node can read; logged commands are redacted anyway.
* **A watchdog** (:mod:`~megatron_gopd.rollout.watchdog`): the server and what it forks form one
  process group led by a small wrapper that ends the group when the process that launched it is
  gone, however it ended (SIGKILL included). :meth:`stop` ends the group, and nothing else: no
  ``pkill``.

Readiness is ``/health`` answering 200 (SGLang answers 503 while starting), never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gopd.rollout.protocol import (
    ServerAuth,
    SGLangFeatures,
    http_json,
    redact_command,
)
from megatron_gopd.utils import GopdError, free_port, get_logger

__all__ = ["RolloutServers", "ServerLaunchConfig", "server_env", "server_info"]

log = get_logger(__name__)

BACKENDS = ("sglang", "cpu", "attach")

# What torchrun sets in every worker (torch/distributed/elastic/agent/server/api.py and
# torch/distributed/run.py), and what reads it: TORCHELASTIC_USE_AGENT_STORE makes torch's tcp://
# rendezvous a client of the agent's store (SGLang then hangs at start-up); RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR/PORT feed any env:// initialisation (SGLang's own with
# SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE=env://, its NIXL store reads MASTER_ADDR).
_TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)
_TORCHRUN_PREFIXES = ("TORCHELASTIC_",)
# SGLang's memory saver does not support expandable segments (slime drops these too); and the
# trainer's own rollout keys are not the server's business
_SGLANG_DROPPED = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_SECRETS = ("GOPD_ROLLOUT_API_KEY", "GOPD_ROLLOUT_ADMIN_API_KEY")


def server_env(environ: dict[str, str] | None = None, *, backend: str = "sglang") -> dict[str, str]:
    """The environment a rollout server starts with: the caller's, minus what torchrun put there
    for its workers (see ``_TORCHRUN_VARS``) and the trainer's secrets."""
    env = dict(os.environ if environ is None else environ)
    drop = set(_TORCHRUN_VARS) | set(_SECRETS)
    if backend == "sglang":
        drop |= set(_SGLANG_DROPPED)
    return {k: v for k, v in env.items() if k not in drop and not k.startswith(_TORCHRUN_PREFIXES)}


def server_info(url: str, auth: ServerAuth | None = None, timeout: float = 30.0) -> dict:
    """A server's ``/server_info`` (``/get_server_info`` before SGLang 0.5.6; both carry
    ``version``). It holds the server's arguments, API keys included: never log it."""
    last = None
    for path in ("/server_info", "/get_server_info"):
        try:
            status, info = http_json(url + path, timeout=timeout, auth=auth)
        except OSError as e:
            raise GopdError(f"{url}{path}: unreachable ({e})") from None
        if status == 200 and isinstance(info, dict):
            return info
        if status == 401:
            raise GopdError(
                f"{url} refused the request (HTTP 401): it was started with --api-key; set "
                "GOPD_ROLLOUT_API_KEY (and GOPD_ROLLOUT_ADMIN_API_KEY for --admin-api-key)"
            )
        last = status
    raise GopdError(f"{url}/server_info answered HTTP {last}")


@dataclass(frozen=True)
class ServerLaunchConfig:
    backend: str = "sglang"  # sglang | cpu | attach
    model_path: str | None = None  # HF directory (the student's HF export)
    urls: tuple[str, ...] = ()  # attach: running servers
    router_url: str | None = None  # attach: an sglang-router in front of ``urls``
    launch_router: bool = False  # start sglang_router in front of the launched servers
    num_servers: int = 1
    tp_size: int = 1
    base_gpu_id: int = 0
    host: str = "127.0.0.1"
    base_port: int | None = None  # None: free ports
    dtype: str = "auto"
    context_length: int | None = None
    mem_fraction_static: float | None = None
    enable_memory_saver: bool = False
    random_seed: int = 0
    # --enable-deterministic-inference: SGLang honours sampling_seed only with it, and pays for
    # it (pytorch sampling backend, batch-invariant kernels, fewer attention backends)
    deterministic: bool = False
    # --enable-fp32-lm-head: fp32 logits, as the trainer computes its log-probs (both backends)
    fp32_lm_head: bool = False
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 900.0
    log_dir: str | None = None
    restart_dead: bool = True
    # keys the servers are started with (launched) or expect (attached)
    auth: ServerAuth = field(default_factory=ServerAuth)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise GopdError(f"unknown rollout backend {self.backend!r} ({', '.join(BACKENDS)})")
        if self.backend == "attach":
            if not self.urls and not self.router_url:
                raise GopdError("attaching to rollout servers needs their URLs (--rollout-urls)")
        else:
            if not self.model_path:
                raise GopdError(f"launching {self.backend} servers needs a model path")
            if self.num_servers < 1 or self.tp_size < 1:
                raise GopdError("num_servers and tp_size must be >= 1")


@dataclass
class _Proc:
    index: int
    url: str
    popen: subprocess.Popen
    log_path: Path


class RolloutServers:
    """The rollout servers of a job (launched or attached); see the module docstring."""

    def __init__(self, config: ServerLaunchConfig):
        self.config = config
        self._procs: list[_Proc | None] = []
        self._router: _Proc | None = None
        self._urls: list[str] = [u.rstrip("/") for u in config.urls]
        self._log_dir = Path(config.log_dir) if config.log_dir else None
        self._tmp_log_dir: tempfile.TemporaryDirectory | None = None
        # every port handed to a child: a free port from the OS is only free until someone binds
        # it, and a server binds its ports only once its model is loaded, so the OS may offer a
        # port already given to a server still starting (two servers would then fight for it)
        self._given_ports: set[int] = set()
        if config.base_port:  # the HTTP ports are fixed: no process group may take one
            self._given_ports.update(range(config.base_port, config.base_port + config.num_servers))

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RolloutServers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> RolloutServers:
        cfg = self.config
        if cfg.backend == "attach":
            bad = [u for u, ok in self._health_all(self._urls).items() if not ok]
            if bad:
                raise GopdError(f"rollout server(s) {', '.join(bad)} do not answer /health")
            return self
        if self._log_dir is None:
            self._tmp_log_dir = tempfile.TemporaryDirectory(prefix="gopd-rollout-logs-")
            self._log_dir = Path(self._tmp_log_dir.name)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._procs = [self._spawn(i) for i in range(cfg.num_servers)]
            for p in self._procs:
                self._wait_ready(p)
            self._urls = [p.url for p in self._procs]
            if cfg.launch_router:
                self._router = self._spawn_router()
                self._wait_ready(self._router)
        except BaseException:
            self.stop()
            raise
        log.info("rollout servers ready: %s", ", ".join(self._urls))
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate every launched server's process group; SIGKILL what outlives ``grace_s``."""
        procs = [p for p in [*self._procs, self._router] if p is not None]
        for p in procs:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            _signal_group(p.popen, signal.SIGKILL)  # also children that ignored SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
        self._procs, self._router = [], None
        if self._tmp_log_dir is not None:
            self._tmp_log_dir.cleanup()
            self._tmp_log_dir = None

    # ------------------------------------------------------------------ what the client uses

    @property
    def urls(self) -> list[str]:
        """The servers (weight sync and admin calls go to each of them)."""
        return list(self._urls)

    @property
    def generate_url(self) -> str | None:
        """Where generation goes when a router fronts the servers, else None."""
        if self._router is not None:
            return self._router.url
        return self.config.router_url.rstrip("/") if self.config.router_url else None

    def replace(self, dead_url: str) -> str | None:
        """Bring a dead server back (the client's ``replace_server``): relaunch the process on
        the same GPUs with a new port and wait for it. Attached servers are not ours to restart;
        returns None for them and when ``restart_dead`` is off."""
        if self.config.backend == "attach" or not self.config.restart_dead:
            return None
        idx = next((i for i, p in enumerate(self._procs) if p and p.url == dead_url), None)
        if idx is None:
            return None
        old = self._procs[idx]
        _signal_group(old.popen, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            old.popen.wait(timeout=10)
        log.warning("restarting rollout server %d (was %s)", idx, dead_url)
        new = self._spawn(idx)
        self._procs[idx] = new
        self._wait_ready(new)
        self._urls[idx] = new.url
        return new.url

    def kill(self, index: int) -> None:
        """SIGKILL server ``index`` (fault injection for tests and drills)."""
        p = self._procs[index]
        if p is not None:
            _signal_group(p.popen, signal.SIGKILL)
            p.popen.wait(timeout=10)

    def tp_size(self, url: str) -> int:
        """TP size of a server (weight sync needs it): our config, else its /server_info."""
        if self.config.backend != "attach":
            return self.config.tp_size
        info = server_info(url, self.config.auth)
        if not isinstance(info.get("tp_size"), int):
            raise GopdError(f"{url}/server_info does not report tp_size")
        return int(info["tp_size"])

    def features(self, url: str) -> SGLangFeatures:
        """What the server's SGLang version can do (from its ``version``)."""
        return SGLangFeatures(str(server_info(url, self.config.auth).get("version", "")))

    # ------------------------------------------------------------------ commands

    def command(
        self, index: int, port: int, *, nccl_port: int | None = None, config_file: str | None = None
    ) -> list[str]:
        """Server ``index``'s command line. ``config_file``: the YAML file holding its keys
        (``--config``); ``nccl_port``: the port of its own process group (SGLang otherwise picks
        one at random, racing its neighbours)."""
        cfg = self.config
        module = "megatron_gopd.cpu_server" if cfg.backend == "cpu" else "sglang.launch_server"
        cmd = [
            sys.executable,
            "-m",
            module,
            "--model-path",
            str(cfg.model_path),
            "--host",
            cfg.host,
            "--port",
            str(port),
            "--tp-size",
            str(cfg.tp_size),
            "--base-gpu-id",
            str(cfg.base_gpu_id + index * cfg.tp_size),
            "--dtype",
            cfg.dtype,
            "--random-seed",
            str(cfg.random_seed + index),
            "--skip-tokenizer-init",
        ]
        if nccl_port is not None:
            cmd += ["--nccl-port", str(nccl_port)]
        if cfg.mem_fraction_static is not None and cfg.backend == "sglang":
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.enable_memory_saver:
            cmd.append("--enable-memory-saver")
        if cfg.context_length:
            cmd += ["--context-length", str(cfg.context_length)]
        if cfg.deterministic:
            cmd.append("--enable-deterministic-inference")
        if cfg.fp32_lm_head:
            cmd.append("--enable-fp32-lm-head")
        if config_file is not None:
            cmd += ["--config", config_file]
        return cmd + list(cfg.extra_args)

    def _port(self, index: int) -> int:
        base = self.config.base_port
        return base + index if base else self._fresh_port()

    def _fresh_port(self) -> int:
        """A free port no child of this launcher was given before."""
        for _ in range(1000):
            port = free_port()
            if port not in self._given_ports:
                self._given_ports.add(port)
                return port
        raise GopdError("the OS offered only ports already given to rollout servers")

    def _auth_file(self, name: str) -> str | None:
        """The server's keys in a YAML file only this user can read (SGLang's ``--config``)."""
        auth = self.config.auth
        if not auth:
            return None
        assert self._log_dir is not None
        path = self._log_dir / f".{name}-auth.yaml"
        lines = []
        if auth.api_key:
            lines.append(f"api-key: {json.dumps(auth.api_key)}")
        if auth.admin_api_key:
            lines.append(f"admin-api-key: {json.dumps(auth.admin_api_key)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return str(path)

    def _spawn(self, index: int) -> _Proc:
        port = self._port(index)
        nccl_port = self._fresh_port()
        cmd = self.command(
            index, port, nccl_port=nccl_port, config_file=self._auth_file(f"server{index}")
        )
        return self._popen(index, cmd, port, f"server{index}")

    def _spawn_router(self) -> _Proc:
        port = self._fresh_port()
        cmd = [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--worker-urls",
            *self._urls,
            "--host",
            self.config.host,
            "--port",
            str(port),
        ]
        return self._popen(-1, cmd, port, "router")

    def _popen(self, index: int, cmd: list[str], port: int, name: str) -> _Proc:
        assert self._log_dir is not None
        log_path = self._log_dir / f"{name}-{port}.log"
        env = server_env(backend=self.config.backend)
        # children import this package: make the caller's import path theirs
        env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
        guarded = [sys.executable, "-m", "megatron_gopd.rollout.watchdog", "--", *cmd]
        with open(log_path, "wb") as f:
            popen = subprocess.Popen(
                guarded, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        log.info("started %s (pid %d): %s", name, popen.pid, " ".join(redact_command(cmd)))
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return _Proc(index, f"http://{host}:{port}", popen, log_path)

    def _wait_ready(self, p: _Proc) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        delay = 0.1
        while True:
            code = p.popen.poll()
            if code is not None:
                raise GopdError(
                    f"rollout server {p.url} exited with code {code} while starting; "
                    f"its log ({p.log_path}) ends with:\n{_tail(p.log_path)}"
                )
            with contextlib.suppress(OSError):
                if http_json(p.url + "/health", timeout=5)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise GopdError(
                    f"rollout server {p.url} not ready after {self.config.startup_timeout_s:.0f}s;"
                    f" its log ends with:\n{_tail(p.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    @staticmethod
    def _health_all(urls: list[str]) -> dict[str, bool]:
        out = {}
        for u in urls:
            try:
                out[u] = http_json(u + "/health", timeout=10)[0] == 200
            except OSError:
                out[u] = False
        return out


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    if popen.poll() is not None and sig != signal.SIGKILL:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])
