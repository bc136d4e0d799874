"""Hostile programs are contained by the code sandbox, each by the limit named in the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time

import pytest

from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.utils import GopdError

LIMITS = SandboxLimits(
    cpu_seconds=1.0,
    wall_seconds=8.0,
    memory_bytes=256 << 20,
    output_bytes=64 << 10,
    max_processes=8,
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def run(sb: Sandbox, code: str):
    return sb.run({"kind": "script", "code": textwrap.dedent(code)})


def needs(sb: Sandbox, layer: str) -> None:
    if not any(x.startswith(layer) for x in sb.isolation):
        pytest.skip(f"this machine offers no {layer} isolation ({sb.isolation})")


def test_ordinary_programs(sandbox):
    assert run(sandbox, "assert sum(range(10)) == 45").status == "passed"
    res = run(sandbox, "assert 1 == 2, 'nope'")
    assert res.status == "failed" and "nope" in res.message
    assert run(sandbox, "def f(:\n  pass").status == "error"  # syntax error
    res = run(sandbox, "print('hello')")
    assert res.passed and res.stdout == "hello\n"


def test_early_exit_and_forged_verdict_do_not_pass(sandbox):
    res = run(sandbox, "import os\nos._exit(0)\nassert False")
    assert res.status == "crashed" and res.exit_code == 0
    res = run(sandbox, "import sys\nsys.exit(0)")
    assert res.status == "error"
    res = run(
        sandbox,
        """
        import os, json
        for fd in range(3, 20):
            try:
                os.write(fd, b'0000 ' + json.dumps({"status": "passed"}).encode() + b'\\n')
            except OSError:
                pass
        os._exit(0)
        """,
    )
    assert res.status == "crashed"


def test_infinite_loop_stopped_by_cpu_limit(sandbox):
    t0 = time.monotonic()
    res = run(sandbox, "while True:\n    pass")
    assert res.status == "cpu_time_limit", res
    assert res.cpu_seconds >= 0.9 and time.monotonic() - t0 < LIMITS.wall_seconds


def test_sleeping_program_stopped_by_wall_clock():
    sb = Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=1.0))
    res = run(sb, "import time\ntime.sleep(60)")
    assert res.status == "wall_timeout" and 1.0 <= res.wall_seconds < 5.0


def test_fork_bomb_stopped_by_process_limit(sandbox):
    res = run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert res.status == "process_limit", res
    assert "Resource temporarily unavailable" in res.message


def test_orphans_do_not_outlive_the_run(sandbox):
    marker = "987.654321"
    res = run(
        sandbox,
        f"""
        import os
        if os.fork() == 0:
            os.setsid()
            os.execv('/bin/sleep', ['sleep', '{marker}'])
        """,
    )
    assert res.passed, res
    time.sleep(0.2)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    leftovers.append(pid)
        except OSError:
            pass
    assert not leftovers, f"sandboxed processes survived their run: {leftovers}"


def test_huge_allocation_stopped_by_memory_limit(sandbox):
    res = run(sandbox, "x = bytearray(8 * 1024**3)")
    assert res.status == "memory_limit", res
    res = run(sandbox, "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024**2))")
    assert res.status == "memory_limit", res


def test_output_flood_stopped_by_output_limit(sandbox):
    res = run(sandbox, "while True:\n    print('x' * 10000)")
    assert res.status == "output_limit", res
    res = run(sandbox, "with open('big', 'wb') as f:\n    f.write(b'0' * (10 * 1024**2))")
    assert res.status == "output_limit", res


def test_writes_outside_the_temp_dir_denied(sandbox, tmp_path):
    needs(sandbox, "landlock")
    os.chmod(tmp_path, 0o777)  # even a world-writable dir is out of reach
    targets = [tmp_path / "escaped.txt", "/tmp/gopd-sandbox-escape.txt"]
    for target in targets:
        res = run(sandbox, f"open({str(target)!r}, 'w').write('pwned')")
        assert res.status == "error" and "PermissionError" in res.message, res
        assert not os.path.exists(target)
    # the project itself is not even readable
    res = run(sandbox, f"print(open({os.path.abspath(__file__)!r}).read())")
    assert res.status == "error" and "PermissionError" in res.message, res
    # its own dir is writable, and removed afterwards
    res = run(sandbox, "import os\nopen('mine.txt', 'w').write('ok')\nprint(os.getcwd())")
    assert res.passed, res
    assert not os.path.exists(res.stdout.strip())


def test_network_denied(sandbox):
    needs(sandbox, "netns")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        res = run(
            sandbox,
            f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
            s.sendall(b'stolen')
            """,
        )
        assert res.status == "error", res
        if any(x.startswith("landlock-abi") and int(x[12:]) >= 4 for x in sandbox.isolation):
            assert "PermissionError" in res.message, res  # landlock denies TCP connect first
        else:
            assert "Network is unreachable" in res.message, res  # the namespace's loopback is down
        # UDP is outside landlock's scope: the network namespace stops it
        udp = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))"
        res = run(sandbox, udp)
        assert res.status == "error" and "Network is unreachable" in res.message, res
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_environment_secrets_not_visible(sandbox, monkeypatch):
    secret = "gopd-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("GOPD_TEST_SECRET", secret)
    res = run(
        sandbox,
        """
        import os
        print(dict(os.environ))
        for path in ('/proc/self/environ', f'/proc/{os.getppid()}/environ', '/proc/1/environ'):
            try:
                print(open(path, 'rb').read())
            except OSError as e:
                print(path, type(e).__name__)
        """,
    )
    assert res.passed, res
    assert secret not in res.stdout and "GOPD_TEST_SECRET" not in res.stdout
    assert "/work" not in res.stdout.split("\n")[0]  # no PYTHONPATH, VIRTUAL_ENV, PWD of ours
    # neither this project nor its dependencies are importable (isolated mode, no site-packages)
    for module in ("megatron_gopd", "torch", "numpy"):
        res = run(sandbox, f"import {module}")
        assert res.status == "error" and "ModuleNotFoundError" in res.message, res


def test_isolation_modes():
    assert Sandbox(LIMITS, isolation="minimal").isolation == ("rlimits", "clean-env", "tmp-cwd")
    with pytest.raises(GopdError, match="isolation must be"):
        Sandbox(LIMITS, isolation="paranoid")
    with pytest.raises(GopdError, match="at least 64 MiB"):
        SandboxLimits(memory_bytes=1 << 20)


@pytest.fixture
def host_unix_socket():
    """A world-writable pathname Unix socket on the host, in a world-writable directory under
    /tmp (what a careless service, or another job on the node, leaves reachable)."""
    d = tempfile.mkdtemp(prefix="gopd-host-sock-", dir="/tmp")
    os.chmod(d, 0o777)
    path = os.path.join(d, "service.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(8)
    dgram_path = os.path.join(d, "dgram.sock")
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(dgram_path)
    os.chmod(dgram_path, 0o777)
    received: list[bytes] = []

    def serve():
        srv.settimeout(0.2)
        dgram.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                conn.settimeout(2)
                received.append(conn.recv(100) or b"<connected>")
                conn.close()
            with contextlib.suppress(OSError):
                received.append(dgram.recv(100))

    stop = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, dgram_path, received
    stop.set()
    t.join()
    srv.close()
    dgram.close()
    shutil.rmtree(d, ignore_errors=True)


def test_host_unix_sockets_unreachable(sandbox, host_unix_socket):
    """Pathname Unix sockets live in the file system, not the network namespace, and landlock
    does not govern connect(): a program reached a 0777 socket under /tmp. Every way to a
    pathname socket is closed: stream connect, datagram sendto, the same through raw syscalls
    (ctypes), and a datagram socketpair re-pointed at the socket. Ordinary programs keep what
    they use (a stream socketpair, as asyncio's event loop does)."""
    path, dgram_path, received = host_unix_socket
    probes = {
        "stream": f"""
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({path!r})
            s.sendall(b'stolen-stream')
            """,
        "datagram": f"""
            import socket
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'stolen-dgram', {dgram_path!r})
            """,
        "raw syscalls": f"""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM
            if fd < 0:
                raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            path = {path!r}.encode()
            addr = ctypes.create_string_buffer(b'\\x01\\x00' + path + b'\\x00', 110)
            if libc.connect(fd, addr, 110) < 0:
                raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            os.write(fd, b'stolen-raw')
            """,
        "socketpair": f"""
            import socket
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b'stolen-pair', {dgram_path!r})
            """,
    }
    for name, code in probes.items():
        res = run(sandbox, code)
        assert res.status == "error" and "PermissionError" in res.message, (name, res)
    time.sleep(0.5)
    assert received == [], f"bytes reached the host's socket: {received}"
    res = run(
        sandbox,
        """
        import asyncio, socket
        a, b = socket.socketpair()
        a.sendall(b'ok')
        assert b.recv(2) == b'ok'
        async def main():
            await asyncio.sleep(0)
            return 42
        assert asyncio.run(main()) == 42
        """,
    )
    assert res.passed, res
