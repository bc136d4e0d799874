"""Run a rollout server so that it dies with the process that started it, however that ends.

::

    python -m megatron_gopd.rollout.watchdog -- python -m sglang.launch_server ...

:class:`~megatron_gopd.rollout.launcher.RolloutServers` starts every server through this wrapper,
as the leader of a process group of its own (the server and everything it forks stay in it). The
wrapper starts the command, then watches its own parent: when the trainer is gone (SIGKILL, an
unhandled SIGTERM, a crash: the wrapper is re-parented), it sends SIGTERM to the whole group,
then SIGKILL to what is left after a grace period. It exits with the server's status when the
server ends first, so the launcher sees that status as before.

Why not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child exits, and the
launcher restarts dead servers from a worker thread (the rollout client's failover), so a
replacement server would be killed as soon as that thread is retired. Why not a pipe: processes
forked by the trainer (data or checkpoint workers) inherit its end and keep it open after the
trainer died. The parent pid is neither: it changes exactly when the parent process is gone.

Standard library only; nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

__all__ = ["main"]

POLL_S = 0.2
GRACE_S = 10.0


def _group_members(pgid: int) -> list[int]:
    """Live pids of the process group ``pgid``, this process and zombies excluded."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(int(entry))
    return out


def _signal_group(pgid: int, sig: int) -> list[int]:
    pids = _group_members(pgid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids


def _stop_group(pgid: int, grace_s: float, child: subprocess.Popen) -> None:
    """SIGTERM to the group (but this process), SIGKILL to what outlives ``grace_s``."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()  # reap it: a zombie child would look alive
        if not _group_members(pgid):
            return
        time.sleep(POLL_S)
    _signal_group(pgid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m megatron_gopd.rollout.watchdog -- COMMAND ...", file=sys.stderr)
        return 2
    parent = os.getppid()
    pgid = os.getpgrp()
    child = subprocess.Popen(argv)
    stopping = {"sig": None}

    def on_signal(signum, frame):
        # the launcher's stop(): the whole group got the signal; pass it on in case the
        # server runs in another group, then wait for it below
        stopping["sig"] = signum
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        code = child.poll()
        if code is not None:
            # the server is done; anything it left in the group goes with it
            _stop_group(pgid, 2.0, child)
            return code if code >= 0 else 128 - code
        if os.getppid() != parent:
            print(
                f"[watchdog] parent {parent} is gone: stopping the server (pid {child.pid})",
                file=sys.stderr,
                flush=True,
            )
            _stop_group(pgid, GRACE_S, child)
            child.wait()
            return 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
