"""Test harness executed inside the sandbox (stdlib only; its source is passed with ``python -c``).

It reads one JSON spec on stdin, runs the candidate program against the tests of one problem,
stops at the first failing test (as LiveCodeBench's and EvalPlus's harnesses do), and writes one
verdict line ``NONCE JSON`` to the inherited ``verdict_fd``. The nonce is read from stdin before
any candidate code runs, so a program that merely prints a verdict-looking line, or exits early
with status 0, does not pass. (A program written to attack this harness, e.g. by searching the
interpreter's memory for the nonce, can forge a verdict: the sandbox protects the host and the run,
not the integrity of the verdict against such code.)

Spec kinds:
- ``script``: ``code`` + ``test`` executed as one module (HumanEval ``check(candidate)`` or MBPP
  asserts); passes if nothing raises.
- ``stdio``: ``code`` run as ``__main__`` once per case with the case's input on fd 0 and fd 1
  captured in a file (so ``input()``, ``sys.stdin.buffer`` and ``open(0)`` all work); compared
  token by token, numbers with a tolerance.
- ``functional``: ``code`` defines ``class Solution`` (LeetCode) or a function ``func_name``; each
  case's input is one JSON value per line (the arguments), its output one JSON value.
- ``io_compare``: EvalPlus differential testing: ``reference`` (the canonical solution) and ``code``
  are called on the same ``inputs``; outputs must match (floats within ``atol``; as sets, or only
  as "is not None", for the few MBPP+ tasks EvalPlus treats so).
"""

import builtins
import copy
import errno
import json
import math
import os
import signal
import sys
import traceback

_PID = os.getpid()


class TestTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that ``except Exception`` in candidate code does not
    swallow it."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _classify(exc: BaseException) -> str:
    if isinstance(exc, TestTimeout):
        return "timeout"
    if isinstance(exc, MemoryError):
        return "memory_limit"
    if isinstance(exc, RecursionError):
        return "error"
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return "output_limit"
        if exc.errno == errno.EAGAIN:  # fork() under RLIMIT_NPROC
            return "process_limit"
    if isinstance(exc, AssertionError):
        return "failed"
    return "error"


def _describe(exc: BaseException) -> str:
    tb = traceback.format_exception_only(type(exc), exc)
    return "".join(tb).strip()[-500:]


def _net_guard(event, args):
    # Fallback only (no network namespace and no landlock net rules): a Python-level veto, which
    # ctypes or a child process would bypass.
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        raise PermissionError("network access disabled by the sandbox (audit hook)")


def _tokens_equal(got: str, want: str) -> bool:
    g, w = got.split(), want.split()
    if g == w:
        return True
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        if a == b:
            continue
        try:
            fa, fb = float(a), float(b)
        except ValueError:
            return False
        if not math.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-6):
            return False
    return True


def _values_equal(got, want, atol: float) -> bool:
    if isinstance(got, float) or isinstance(want, float):
        try:
            if math.isnan(got) and math.isnan(want):
                return True
            return math.isclose(got, want, rel_tol=1e-7, abs_tol=max(atol, 1e-9))
        except TypeError:
            return False
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_values_equal(a, b, atol) for a, b in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_values_equal(got[k], want[k], atol) for k in got)
    return got == want


def _jsonable(x):
    """LiveCodeBench compares tuples as lists."""
    try:
        return json.loads(json.dumps(x))
    except (TypeError, ValueError):
        return x


def _fresh_module_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins}


def _run_stdio(spec, code):
    for i, case in enumerate(spec["cases"]):
        in_path, out_path = f"_in{i}.txt", f"_out{i}.txt"
        with open(in_path, "w") as f:
            f.write(case["input"])
        in_fd = os.open(in_path, os.O_RDONLY)
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        saved = os.dup(0), os.dup(1)
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        try:
            try:
                exec(code, _fresh_module_globals())
            except SystemExit as e:
                if e.code not in (None, 0):
                    return {"status": "error", "failed_test": i, "message": f"exit {e.code}"}
            finally:
                sys.stdout.flush()
        finally:
            os.dup2(saved[0], 0)
            os.dup2(saved[1], 1)
            for fd in (*saved, in_fd, out_fd):
                os.close(fd)
            sys.stdin, sys.stdout = sys.__stdin__, sys.__stdout__
        with open(out_path, errors="replace") as f:
            got = f.read()
        if not _tokens_equal(got, case["output"]):
            return {"status": "failed", "failed_test": i, "message": "wrong answer"}
    return None


def _run_functional(spec, code):
    ns = _fresh_module_globals()
    exec(code, ns)
    name = spec["func_name"]
    if "Solution" in ns and hasattr(ns["Solution"], name):
        fn = getattr(ns["Solution"](), name)
    elif callable(ns.get(name)):
        fn = ns[name]
    else:
        return {"status": "error", "message": f"no function {name!r} defined"}
    for i, case in enumerate(spec["cases"]):
        args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
        want = json.loads(case["output"])
        if not _values_equal(_jsonable(fn(*args)), want, 0.0):
            return {"status": "failed", "failed_test": i, "message": "wrong answer"}
    return None


def _run_io_compare(spec, code):
    entry = spec["entry_point"]
    ref_ns, cand_ns = _fresh_module_globals(), _fresh_module_globals()
    exec(spec["reference"], ref_ns)
    exec(code, cand_ns)
    if not callable(cand_ns.get(entry)):
        return {"status": "error", "message": f"no function {entry!r} defined"}
    atol = float(spec.get("atol") or 0.0)
    compare = spec.get("compare", "exact")
    for i, args in enumerate(spec["inputs"]):
        want = ref_ns[entry](*copy.deepcopy(args))
        got = cand_ns[entry](*copy.deepcopy(args))
        if compare == "set":
            want, got = set(want), set(got)
        elif compare == "not_none":
            want, got = want is not None, got is not None
        if not _values_equal(got, want, atol):
            return {"status": "failed", "failed_test": i, "message": "wrong answer"}
    return None


def main():
    spec = json.loads(sys.stdin.buffer.read())
    os.close(0)
    nonce = spec.pop("nonce")
    verdict_fd = spec["verdict_fd"]
    if spec.get("net_guard"):
        sys.addaudithook(_net_guard)
    signal.signal(signal.SIGALRM, _on_alarm)
    timeout = spec.get("timeout")
    n_tests = max(1, len(spec.get("cases") or spec.get("inputs") or [None]))
    if timeout:  # per test in the harness; the sandbox's CPU and wall limits stay the backstop
        signal.setitimer(signal.ITIMER_REAL, float(timeout) * n_tests)
    verdict = None
    try:
        kind = spec["kind"]
        if kind == "script":
            code = compile(spec["code"] + "\n\n" + spec.get("test", ""), "<program>", "exec")
            try:
                exec(code, _fresh_module_globals())
            except SystemExit as e:
                verdict = {"status": "error", "message": f"program exited ({e.code}) early"}
        else:
            code = compile(spec["code"], "<program>", "exec")
            runner = {"stdio": _run_stdio, "functional": _run_functional}.get(kind, _run_io_compare)
            verdict = runner(spec, code)
    except BaseException as e:  # the candidate's failure, whatever it is, is the verdict
        if os.getpid() != _PID:  # a fork of the candidate's: no verdict from copies
            os._exit(1)
        verdict = {"status": _classify(e), "message": _describe(e)}
    signal.setitimer(signal.ITIMER_REAL, 0)
    if os.getpid() != _PID:
        os._exit(0)
    for stream in (sys.stdout, sys.stderr):  # os._exit below does not flush
        try:
            stream.flush()
        except BaseException as e:
            verdict = verdict or {"status": _classify(e), "message": _describe(e)}
    verdict = verdict or {"status": "passed"}
    os.write(verdict_fd, (nonce + " " + json.dumps(verdict) + "\n").encode())
    os._exit(0)


main()
