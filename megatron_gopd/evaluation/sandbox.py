"""Run untrusted generated code: one separate, limited, isolated process per (sample, problem).

Layers, each used when the machine offers it (``Sandbox.isolation`` says which are active; all of
them are on a stock Debian 12 kernel, as root or not):

- **Process and limits** (always): a new session; ``RLIMIT_CPU`` (SIGKILL at the limit),
  ``RLIMIT_AS`` (allocations fail with ``MemoryError``), ``RLIMIT_FSIZE`` (stdout, stderr and
  every file the program writes; Python ignores SIGXFSZ, so writes fail with ``EFBIG``),
  ``RLIMIT_NPROC`` (fork bombs: ``fork()`` fails with ``EAGAIN``), ``RLIMIT_NOFILE``, no core
  dumps; a wall-clock limit after which the launcher's whole process group is SIGKILLed.
- **Clean environment**: ``env`` is a fixed minimal dict (no variable of the caller's reaches the
  program), cwd and ``HOME``/``TMPDIR`` are a fresh private temp dir removed afterwards; the
  interpreter runs with ``-I -S`` (no site-packages, no ``PYTHON*`` variables, no user site), so
  neither this project nor its dependencies are importable.
- **Namespaces** (``unshare``; as root, or as any user with unprivileged user namespaces): a new
  network namespace (only a downed loopback: no network at all, UDP and unix-abstract included),
  a new pid namespace whose init is the program (when it exits, every process it left is killed,
  even ones that called ``setsid()``), a new IPC namespace.
- **Landlock** (Linux >= 5.13, unprivileged): the file system is read-only and limited to the
  interpreter's prefix and the system library dirs; only the temp dir is writable; the project,
  ``/tmp``, ``/home``, ``/proc`` are invisible. ABI >= 4 also denies TCP bind/connect, ABI >= 6
  denies signals to processes outside the sandbox (the evaluator itself).
- **Seccomp** (x86_64, aarch64): no Unix-domain sockets (``socket(AF_UNIX)``, non-stream
  ``socketpair``, ``io_uring_setup`` fail with EACCES). Pathname sockets are file-system objects
  that neither the network namespace nor landlock's rules cover: without this, a program could
  ``connect()`` to any world-writable socket on the host (a service's, another job's). A
  connected stream ``socketpair`` (asyncio's event loop) still works.
- **A dedicated uid** (only when the caller is root): the program runs as an unused uid, so
  ``RLIMIT_NPROC`` is enforced (root is exempt from it) and its processes are found and killed
  by uid if the pid namespace is unavailable.
- **Fallback**: without a network namespace and without landlock-net, a Python audit hook vetoes
  socket connect/bind/send (bypassable with ctypes: a warning says so once).

What this does *not* stop (no general seccomp filter, no cgroup, no mount namespace): kernel
exploits through any syscall; limits are per process, so up to ``max_processes`` processes may each use
``cpu_seconds`` of CPU (until the wall-clock limit) and ``memory_bytes`` of memory; filling the disk
under the temp dir with
many files of up to ``output_bytes`` each until the wall-clock limit (no quota); reading
world-readable files under the allowed system dirs (``/usr``, ``/etc/ld.so.cache``); programs that
attack the in-process test harness to forge a verdict (see ``_harness.py``). Without landlock a
program running as the caller's (non-root) uid can read and write whatever that user can: for
untrusted code at scale, run the evaluator as root (it drops to a dedicated uid) or in a container.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gopd.utils import GopdError, get_logger

__all__ = ["Sandbox", "SandboxLimits", "SandboxResult"]

_HERE = Path(__file__).resolve().parent
_LAUNCHER = str(_HERE / "_launcher.py")
_HARNESS_SRC = (_HERE / "_harness.py").read_text(encoding="utf-8")
_SYSTEM_READ_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/localtime",
)
_DEVICES_RW = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_UID_BASE = 1_900_000_000  # far above any real account; one block of 64 per evaluator process
_log = get_logger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``cpu_seconds`` and ``wall_seconds`` cover the whole run (all the tests of
    one problem); ``memory_bytes`` is address space, so it must leave room for the interpreter."""

    cpu_seconds: float = 10.0
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    max_processes: int = 16
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if self.cpu_seconds <= 0 or self.wall_seconds <= 0:
            raise GopdError("sandbox time limits must be positive")
        if self.memory_bytes < 64 << 20:
            raise GopdError("sandbox memory limit must be at least 64 MiB (the interpreter)")


@dataclass
class SandboxResult:
    """How one run ended. ``status`` is ``passed`` or the first reason it did not pass:
    ``failed`` (wrong answer or assertion), ``error`` (exception, syntax error, early exit),
    ``timeout`` (harness per-test alarm), ``wall_timeout``, ``cpu_time_limit``, ``memory_limit``,
    ``output_limit``, ``process_limit``, ``crashed`` (died without a verdict)."""

    status: str
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _traversable_by_others(path: str) -> bool:
    """Whether a uid with no relation to the owner can reach and execute ``path``."""
    p = Path(path)
    for part in [p, *p.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def _prefix_of(python: str) -> str:
    """``/usr/bin/python3.11`` -> ``/usr``: where the interpreter's stdlib lives."""
    return str(Path(os.path.realpath(python)).parent.parent)


class Sandbox:
    """Runs harness specs (see ``_harness.py``) under :class:`SandboxLimits`; thread-safe.

    ``python``: the interpreter for the programs (default: this one if a sandbox uid may execute
    it, else ``/usr/bin/python3``). ``isolation``: ``auto`` uses every layer the machine offers,
    ``strict`` raises if namespaces or landlock are missing, ``minimal`` uses limits and the clean
    environment only (for debugging).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        python: str | None = None,
        isolation: str = "auto",
        tmp_root: str | None = None,
    ) -> None:
        if isolation not in ("auto", "strict", "minimal"):
            raise GopdError(f"sandbox isolation must be auto, strict or minimal, not {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.tmp_root = tmp_root or tempfile.gettempdir()
        self._is_root = os.geteuid() == 0
        self._slots = itertools.count()
        self._slot_lock = threading.Lock()
        self._free_slots: list[int] = []
        self.python = python or self._default_python()
        if not os.access(self.python, os.X_OK):
            raise GopdError(f"sandbox interpreter {self.python} is not executable")
        self._unshare = False
        self._landlock_abi = 0
        self._seccomp: list | None = None
        self.isolation: tuple[str, ...] = ("rlimits", "clean-env", "tmp-cwd")
        if isolation != "minimal":
            self._probe(strict=isolation == "strict")

    # ------------------------------------------------------------------ set-up

    def _default_python(self) -> str:
        mine = os.path.realpath(sys.executable)
        if not self._is_root or _traversable_by_others(mine):
            return mine
        if os.access("/usr/bin/python3", os.X_OK):
            return "/usr/bin/python3"
        raise GopdError(
            f"the sandbox runs programs as an unprivileged uid, which cannot execute {mine}; "
            "pass a world-executable interpreter (--sandbox-python /usr/bin/python3)"
        )

    def _probe(self, *, strict: bool) -> None:
        """Find out once which layers work here, by running a trivial program through each."""
        import platform

        from megatron_gopd.evaluation._launcher import landlock_abi, unix_socket_filter

        self._landlock_abi = landlock_abi()
        self._seccomp = unix_socket_filter(platform.machine())
        self._unshare = True
        ok = self._try({"kind": "script", "code": "pass"})
        if not ok:
            self._unshare = False
            ok = self._try({"kind": "script", "code": "pass"})
        if not ok and self._landlock_abi:
            self._landlock_abi = 0
            ok = self._try({"kind": "script", "code": "pass"})
        if not ok and self._seccomp:
            self._seccomp = None
            ok = self._try({"kind": "script", "code": "pass"})
        if not ok:
            res = self.run({"kind": "script", "code": "pass"})
            raise GopdError(f"the code sandbox cannot run {self.python}: {res.message}")
        layers = list(self.isolation)
        if self._unshare:
            layers += ["netns", "pidns"]
        if self._landlock_abi:
            layers.append(f"landlock-abi{self._landlock_abi}")
        if self._seccomp:
            layers.append("seccomp-unix")
        if self._is_root:
            layers.append("dedicated-uid")
        self.isolation = tuple(layers)
        missing = [
            n
            for n, on in (
                ("namespaces", self._unshare),
                ("landlock", self._landlock_abi),
                ("seccomp", self._seccomp),
            )
            if not on
        ]
        if missing and strict:
            raise GopdError(
                f"strict sandbox isolation requested but {', '.join(missing)} unavailable"
            )
        if missing:
            _log.warning(
                "code sandbox without %s: %s",
                " and ".join(missing),
                "network blocked by a Python audit hook only"
                if not self._net_isolated
                else "file system limited by permissions only"
                if not self._landlock_abi
                else "the host's Unix sockets are reachable",
            )

    def _try(self, spec: dict) -> bool:
        return self.run(spec).passed

    @property
    def _net_isolated(self) -> bool:
        return self._unshare or self._landlock_abi >= 4

    @contextlib.contextmanager
    def _uid_slot(self):
        with self._slot_lock:
            slot = self._free_slots.pop() if self._free_slots else next(self._slots)
        try:
            yield _UID_BASE + (os.getpid() % 100_000) * 64 + slot % 64
        finally:
            with self._slot_lock:
                self._free_slots.append(slot)

    # ------------------------------------------------------------------ run

    def run(self, spec: dict[str, Any]) -> SandboxResult:
        """Run one harness spec; never raises for anything the program does."""
        with self._uid_slot() as uid:
            return self._run(spec, uid if self._is_root else None)

    def _run(self, spec: dict[str, Any], uid: int | None) -> SandboxResult:
        with contextlib.ExitStack() as stack:
            work = tempfile.mkdtemp(prefix="gopd-sbx-", dir=self.tmp_root)
            stack.callback(_rmtree, work)
            ctl = tempfile.mkdtemp(prefix="gopd-sbx-ctl-", dir=self.tmp_root)  # not the program's
            stack.callback(_rmtree, ctl)
            if uid is not None:
                os.chown(work, uid, uid)
                if not self._unshare:  # processes that left the session, without a pid namespace
                    stack.callback(_kill_uid, uid)
            os.chmod(work, 0o700)
            files = {
                n: stack.enter_context(open(os.path.join(ctl, n), "w+b"))
                for n in ("spec", "out", "err", "verdict", "status")
            }
            nonce = secrets.token_hex(16)
            spec = dict(spec, nonce=nonce, verdict_fd=files["verdict"].fileno())
            spec.setdefault("net_guard", not self._net_isolated)
            files["spec"].write(json.dumps(spec).encode())
            files["spec"].seek(0)
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": work,
                "TMPDIR": work,
                "LANG": "C.UTF-8",
                "PYTHONIOENCODING": "utf-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONHASHSEED": "0",
            }
            cfg = {
                "python": self.python,
                "argv": [self.python, "-I", "-S", "-c", _HARNESS_SRC],
                "env": env,
                "status_fd": files["status"].fileno(),
                "unshare": self._unshare,
                "uid": uid,
                "gid": uid,
                "rlimits": self._rlimits(),
                "landlock": self._landlock_rules(work) if self._landlock_abi else None,
                "seccomp": self._seccomp,
            }
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(cfg)],
                stdin=files["spec"],
                stdout=files["out"],
                stderr=files["err"],
                cwd=work,
                env=env,
                pass_fds=(files["verdict"].fileno(), files["status"].fileno()),
                start_new_session=True,
            )
            stack.callback(self._kill, proc)  # on any exception below
            pidfd = os.pidfd_open(proc.pid)
            stack.callback(os.close, pidfd)
            # wait without reaping: the launcher, even as a zombie, keeps its process group id
            # from being reused until the group has been killed
            killed = not select.select([pidfd], [], [], self.limits.wall_seconds)[0]
            self._kill(proc)
            wall = time.monotonic() - t0
            return self._result(files, nonce, killed=killed, wall=wall)

    def _rlimits(self) -> dict[str, list[int]]:
        lim = self.limits
        cpu = max(1, math.ceil(lim.cpu_seconds))  # RLIMIT_CPU counts whole seconds
        if self._is_root or self._unshare:
            nproc = lim.max_processes  # a dedicated uid, or a fresh user namespace
        else:  # the caller's own uid: the limit counts all of its processes, so add those
            nproc = _count_own_processes() + lim.max_processes
        return {
            # soft == hard: SIGKILL at the limit (the program is a pid namespace's init, which
            # does not receive the SIGXCPU that a lower soft limit would send first)
            "CPU": [cpu, cpu],
            "AS": [lim.memory_bytes, lim.memory_bytes],
            "FSIZE": [lim.output_bytes, lim.output_bytes],
            "NOFILE": [lim.max_open_files, lim.max_open_files],
            "NPROC": [nproc, nproc],
            "CORE": [0, 0],
        }

    def _landlock_rules(self, work: str) -> dict:
        read = sorted({_prefix_of(self.python), *_SYSTEM_READ_PATHS})
        return {"abi": self._landlock_abi, "read": read, "write": [work, *_DEVICES_RW]}

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGKILL the launcher's process group (whatever the program left in it), then reap."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _result(self, files, nonce: str, *, killed: bool, wall: float) -> SandboxResult:
        def read(name: str, limit: int = 8192) -> str:
            f = files[name]
            f.seek(0)
            return f.read(limit).decode("utf-8", errors="replace")

        st: dict[str, Any] = {}
        raw = read("status")
        if raw:
            with contextlib.suppress(json.JSONDecodeError):
                st = json.loads(raw)
        verdict: dict[str, Any] = {}
        for line in read("verdict", 1 << 16).splitlines():
            tag, _, payload = line.partition(" ")
            if tag == nonce:
                with contextlib.suppress(json.JSONDecodeError):
                    verdict = json.loads(payload)
        res = SandboxResult(
            status="crashed",
            exit_code=st.get("exit_code"),
            signal=st.get("signal"),
            cpu_seconds=float(st.get("cpu_seconds", 0.0)),
            wall_seconds=wall,
            stdout=read("out"),
            stderr=read("err"),
            verdict=verdict,
        )
        sig = res.signal
        if killed:
            res.status, res.message = (
                "wall_timeout",
                f"killed after {self.limits.wall_seconds:g}s wall clock",
            )
        elif st.get("setup_error"):
            res.status, res.message = "crashed", f"sandbox set-up failed: {st['setup_error']}"
        elif sig == signal.SIGXCPU or (
            sig == signal.SIGKILL and res.cpu_seconds >= 0.9 * math.ceil(self.limits.cpu_seconds)
        ):
            res.status, res.message = "cpu_time_limit", f"used {res.cpu_seconds:.1f}s CPU"
        elif sig == signal.SIGXFSZ:
            res.status, res.message = (
                "output_limit",
                f"wrote more than {self.limits.output_bytes} bytes",
            )
        elif verdict:
            res.status, res.message = verdict.get("status", "crashed"), verdict.get("message", "")
        elif sig is not None:
            res.message = f"killed by signal {signal.Signals(sig).name}"
        else:
            res.message = f"exited with status {res.exit_code} before the tests finished"
        return res


# ---------------------------------------------------------------------- helpers


@functools.cache
def _own_uid() -> int:
    return os.getuid()


def _proc_uids():
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        yield int(entry.name), int(line.split()[1])
                        break
        except OSError:
            continue


def _count_own_processes() -> int:
    me = _own_uid()
    return sum(1 for _, uid in _proc_uids() if uid == me)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a dedicated sandbox uid (root only), until none is left."""
    for _ in range(20):
        pids = [pid for pid, u in _proc_uids() if u == uid]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _rmtree(path: str) -> None:
    """Remove a sandbox dir even if the program chmod-ed parts of it read-only."""

    def fix(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)

    shutil.rmtree(path, onerror=fix)
