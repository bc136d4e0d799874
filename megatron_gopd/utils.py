"""Small helpers shared across the package: ports, logging, user-facing errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

__all__ = [
    "GopdError",
    "check_writable",
    "cli_errors",
    "exit_with_parent",
    "free_port",
    "get_logger",
    "json_object_line",
    "parent_bound_manager",
    "port_available",
    "read_text_file",
]


class GopdError(Exception):
    """An error caused by the user's input or environment, shown as one line (no traceback)."""


def json_object_line(path: str | Path, lineno: int, line: str) -> dict:
    """Line ``lineno`` of the jsonl file ``path`` as a dict, or a :class:`GopdError` naming both."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise GopdError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise GopdError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """In a helper process: exit as soon as ``parent_pid`` is no longer its parent (the parent
    died, however: SIGKILL runs no clean-up). A daemon thread polls the parent pid, which, unlike
    ``PR_SET_PDEATHSIG``, does not depend on which of the parent's threads forked us."""
    import threading
    import time

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def parent_bound_manager(method: str):
    """A started ``multiprocessing`` SyncManager (``method``: fork, spawn, forkserver) whose
    server process exits when this process is gone. A plain Manager's server outlives a parent
    killed with SIGKILL (measured: fork, spawn and forkserver alike) and sits there forever."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context(method))
    manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
    return manager


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``, or one :class:`GopdError` naming ``what`` and the file (it is
    missing or unreadable, or it is not text: a binary file where text belongs)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GopdError(
            f"{what} {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start}): a binary "
            f"file?"
        ) from None
    except OSError as e:
        raise GopdError(f"cannot read {what} {p}: {e.strerror or e}") from None


def check_writable(path: str | Path, flag: str, *, directory: bool) -> None:
    """Raise one :class:`GopdError` unless the output ``path`` (a directory, or a file) can be
    created and written, so that a tool fails before its work rather than after it.

    A temporary file is created and removed in ``path`` (a directory that exists) or in its
    nearest existing ancestor; nothing else is created. Trying beats ``os.access``, which answers
    yes to root on a read-only file system."""
    import tempfile

    p = Path(path).absolute()
    if p.exists() and p.is_dir() != directory:
        kind = "a directory" if p.is_dir() else "a file"
        raise GopdError(f"{flag} {path} cannot be written: it is {kind}")
    target = p if p.is_dir() else p.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        if not target.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(target))
        fd, probe = tempfile.mkstemp(prefix=".gopd-write-check-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GopdError(f"{flag} {path} cannot be written: {e.strerror or e} ({target})") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_available(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` (IPv4 or IPv6) right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def get_logger(name: str = "megatron_gopd") -> logging.Logger:
    # modules run with ``python -m`` are named "__main__": keep them under the package's handler
    if name != "megatron_gopd" and not name.startswith("megatron_gopd."):
        name = f"megatron_gopd.{name.strip('_') or 'main'}"
    logger = logging.getLogger(name)
    if not logging.getLogger("megatron_gopd").handlers:
        h = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK")
        tag = f"[rank{rank}] " if rank not in (None, "0") else ""
        h.setFormatter(
            logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root = logging.getLogger("megatron_gopd")
        root.addHandler(h)
        root.setLevel(os.environ.get("GOPD_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger


def cli_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Turn :class:`GopdError` into one ``error: ...`` line and exit 2.

    Anything else is a bug and keeps its traceback.
    """

    @wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except GopdError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


# Warnings that megatron-core / torch print on every CPU run and that say nothing actionable there:
# the fused kernels they miss are CUDA-only, and the deprecations are inside megatron-core itself.
_EXPECTED_ON_CPU = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*`load_state_dict` is deprecated.*",
    r".*Please use DTensor instead.*",
    r".*`torch_dtype` is deprecated.*",
)


def quiet_expected_warnings() -> None:
    """Silence warnings that are expected on a CPU-only machine (kept on GPU machines, where a
    missing Transformer Engine or Apex is worth knowing about)."""
    import warnings

    import torch

    if torch.cuda.is_available():
        return
    for pattern in _EXPECTED_ON_CPU:
        warnings.filterwarnings("ignore", message=pattern)
