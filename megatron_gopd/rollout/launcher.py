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
``python -m megatron_gopd.cpu_server`` (tests, the tiny demo). ``backend="attach"`` uses
servers someone else runs (``--rollout-urls``), optionally behind an sglang-router
(``router_url``); ``launch_router=True`` starts ``sglang_router`` in front of launched servers.

Every launched server is its own process group (``start_new_session``), so :meth:`stop` ends the
server and the scheduler/detokenizer processes it forked, and nothing else: no ``pkill``.
Readiness is ``/health`` answering 200 (SGLang answers 503 while starting), never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.utils import GopdError, free_port, get_logger

__all__ = ["RolloutServers", "ServerLaunchConfig"]

log = get_logger(__name__)

BACKENDS = ("sglang", "cpu", "attach")


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
    deterministic: bool = False  # --enable-deterministic-inference: honours sampling_seed
    # --enable-fp32-lm-head: fp32 logits, as the trainer computes its log-probs (both backends)
    fp32_lm_head: bool = False
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 900.0
    log_dir: str | None = None
    restart_dead: bool = True

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
            if self.backend == "cpu" and self.tp_size != 1:
                raise GopdError("the CPU rollout server supports tp_size 1 only")


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
        try:
            status, info = http_json(f"{url}/server_info", timeout=30)
        except OSError as e:
            raise GopdError(f"{url}/server_info: unreachable ({e})") from None
        if status != 200 or not isinstance(info, dict) or "tp_size" not in info:
            raise GopdError(f"{url}/server_info does not report tp_size (HTTP {status})")
        return int(info["tp_size"])

    # ------------------------------------------------------------------ commands

    def command(self, index: int, port: int) -> list[str]:
        cfg = self.config
        if cfg.backend == "cpu":
            cmd = [
                sys.executable,
                "-m",
                "megatron_gopd.cpu_server",
                "--model-path",
                str(cfg.model_path),
                "--host",
                cfg.host,
                "--port",
                str(port),
                "--dtype",
                cfg.dtype,
                "--random-seed",
                str(cfg.random_seed + index),
            ]
            if cfg.context_length:
                cmd += ["--context-length", str(cfg.context_length)]
            if cfg.fp32_lm_head:
                cmd.append("--enable-fp32-lm-head")
            return cmd + list(cfg.extra_args)
        cmd = [
            sys.executable,
            "-m",
            "sglang.launch_server",
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
        if cfg.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.enable_memory_saver:
            cmd.append("--enable-memory-saver")
        if cfg.context_length:
            cmd += ["--context-length", str(cfg.context_length)]
        if cfg.deterministic:
            cmd.append("--enable-deterministic-inference")
        if cfg.fp32_lm_head:
            cmd.append("--enable-fp32-lm-head")
        return cmd + list(cfg.extra_args)

    def _port(self, index: int) -> int:
        base = self.config.base_port
        return base + index if base else free_port()

    def _spawn(self, index: int) -> _Proc:
        port = self._port(index)
        cmd = self.command(index, port)
        return self._popen(index, cmd, port, f"server{index}")

    def _spawn_router(self) -> _Proc:
        port = free_port()
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
        env = dict(os.environ)
        # children import this package: make the caller's import path theirs
        env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
        with open(log_path, "wb") as f:
            popen = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        log.info("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return _Proc(index, f"http://{self.config.host}:{port}", popen, log_path)

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
