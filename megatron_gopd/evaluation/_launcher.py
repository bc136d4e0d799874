"""Sandbox launcher: applies the isolation, forks the program, reports how it ended.

Run as ``python -I -S _launcher.py CONFIG_JSON`` by :mod:`megatron_gopd.evaluation.sandbox`, never
imported. It is a separate executable (and stdlib only) rather than a ``preexec_fn`` because
``preexec_fn`` is unsafe when the caller has threads (the evaluator runs sandboxes from a thread
pool), and because the pid namespace needs a process that forks once more:

    launcher: unshare(net, pid[, user]) -> setrlimit -> fork -> wait4 -> status JSON on status_fd
      child (pid 1 of the new pid namespace): PDEATHSIG=SIGKILL -> landlock -> seccomp -> setuid
                                              -> execve

When the child (the namespace's init) exits, the kernel kills every process left in the namespace:
a program that forks and ``setsid()``s cannot outlive its run. Killing the launcher (the
evaluator's wall-clock limit) kills the child through PDEATHSIG.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
AF_UNIX, SOCK_STREAM, SOCK_TYPE_MASK, EACCES = 1, 1, 0xF, 13
# machine -> (AUDIT_ARCH_*, socket, socketpair, io_uring_setup); x86_64's x32 numbers have bit 30 set
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, 41, 53, 425),
    "aarch64": (0xC00000B7, 198, 199, 425),
}

RLIMITS = {
    "CPU": resource.RLIMIT_CPU,
    "AS": resource.RLIMIT_AS,
    "FSIZE": resource.RLIMIT_FSIZE,
    "NOFILE": resource.RLIMIT_NOFILE,
    "NPROC": resource.RLIMIT_NPROC,
    "CORE": resource.RLIMIT_CORE,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def landlock_abi() -> int:
    """The kernel's landlock ABI version, 0 if landlock is absent or disabled."""
    ret = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(ret), 0)


def apply_landlock(read_paths: list, write_paths: list, abi: int) -> None:
    """Restrict this process and its descendants: read/execute ``read_paths``, anything in
    ``write_paths``, nothing else on the file system; no TCP bind/connect (ABI >= 4); no signals to
    or abstract unix sockets of processes outside the sandbox (ABI >= 6)."""
    fs = FS_ALL_V1
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    if abi >= 5:
        fs |= FS_IOCTL_DEV
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    ruleset = _check(
        _libc.syscall(
            ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        ),
        "landlock_create_ruleset",
    )
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for paths, access in ((read_paths, read), (write_paths, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = access if os.path.isdir(path) else access & FS_FILE_RIGHTS
                rule = _PathBeneathAttr(allowed & fs, fd)
                _check(
                    _libc.syscall(
                        ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                        ctypes.c_int(ruleset),
                        ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(fd)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)
        ),
        "landlock_restrict_self",
    )
    os.close(ruleset)


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


def _assemble(program: list) -> list:
    """``(code, k, jump_true_label, jump_false_label)`` and ``"label"`` items -> BPF instructions
    (conditional jumps are relative to the next instruction)."""
    labels, n = {}, 0
    for item in program:
        if isinstance(item, str):
            labels[item] = n
        else:
            n += 1
    out = []
    for item in program:
        if isinstance(item, str):
            continue
        code, k, jt, jf = item
        here = len(out) + 1
        out.append(
            (code, labels[jt] - here if jt else 0, labels[jf] - here if jf else 0, k & 0xFFFFFFFF)
        )
    return out


def unix_socket_filter(machine: str) -> list | None:
    """The seccomp program that keeps the program away from pathname Unix sockets, or None where
    the architecture's syscall numbers are not known here.

    Pathname sockets are file-system objects: the network namespace does not hide them, and
    landlock does not govern ``connect()``. BPF cannot read the address a ``connect()`` or
    ``sendto()`` points at, so the sockets themselves are refused (EACCES): ``socket(AF_UNIX,
    ...)``, and ``socketpair(AF_UNIX, ...)`` except of stream type (a connected stream pair cannot
    be pointed elsewhere: ``connect`` gives EISCONN, ``sendto`` with an address is refused;
    asyncio's event loop needs one). ``io_uring_setup`` is refused too (io_uring can create and
    connect sockets without those syscalls). Any other architecture's syscalls (i386 from
    x86_64) kill the process."""
    if machine not in SECCOMP_ARCHES:
        return None
    arch, nr_socket, nr_socketpair, nr_io_uring_setup = SECCOMP_ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | EACCES
    nr, arg0, arg1 = 0, 16, 24  # offsets in struct seccomp_data (args: low 32 bits, little-endian)
    program = [
        (BPF_LD_W_ABS, 4, None, None),
        (BPF_JEQ_K, arch, "native", "kill"),
        "native",
        (BPF_LD_W_ABS, nr, None, None),
    ]
    if machine == "x86_64":
        program += [(BPF_JGE_K, 0x40000000, "deny", "native64")]
    program += [
        "native64",
        (BPF_JEQ_K, nr_socket, "socket", "not_socket"),
        "not_socket",
        (BPF_JEQ_K, nr_socketpair, "socketpair", "not_socketpair"),
        "not_socketpair",
        (BPF_JEQ_K, nr_io_uring_setup, "deny", "allow"),
        "socket",
        (BPF_LD_W_ABS, arg0, None, None),
        (BPF_JEQ_K, AF_UNIX, "deny", "allow"),
        "socketpair",
        (BPF_LD_W_ABS, arg0, None, None),
        (BPF_JEQ_K, AF_UNIX, "unix_pair", "allow"),
        "unix_pair",
        (BPF_LD_W_ABS, arg1, None, None),
        (BPF_AND_K, SOCK_TYPE_MASK, None, None),
        (BPF_JEQ_K, SOCK_STREAM, "allow", "deny"),
        "allow",
        (BPF_RET_K, SECCOMP_RET_ALLOW, None, None),
        "deny",
        (BPF_RET_K, deny, None, None),
        "kill",
        (BPF_RET_K, SECCOMP_RET_KILL_PROCESS, None, None),
    ]
    return _assemble(program)


def apply_seccomp(instructions: list) -> None:
    """Install a seccomp filter on this process and its descendants (after NO_NEW_PRIVS)."""
    filters = (_SockFilter * len(instructions))(*[_SockFilter(*i) for i in instructions])
    prog = _SockFprog(len(instructions), filters)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


def _child(cfg: dict, alive_r: int, err_w: int) -> None:
    """Runs in the forked child; never returns (execve or _exit)."""
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        # the launcher may have died before PDEATHSIG was armed: its end of the pipe is then closed
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(137)
        os.close(alive_r)
        os.close(cfg["status_fd"])  # the program must not be able to forge the launcher's report
        if cfg.get("landlock"):
            ll = cfg["landlock"]
            apply_landlock(ll["read"], ll["write"], ll["abi"])
        if cfg.get("seccomp"):
            apply_seccomp(cfg["seccomp"])
        if cfg.get("uid") is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        os.execve(cfg["python"], cfg["argv"], cfg["env"])
    except BaseException as e:  # report set-up failures to the launcher, not as a program failure
        os.write(err_w, f"{type(e).__name__}: {e}".encode()[:2000])
        os._exit(126)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    status: dict = {}
    try:
        if cfg.get("unshare"):
            flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
            if os.geteuid() != 0:
                flags |= CLONE_NEWUSER
            _check(_libc.unshare(flags), "unshare")
        # after unshare: in a new user namespace RLIMIT_NPROC then counts this sandbox's processes
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(RLIMITS[name], (soft, hard))
        alive_r, alive_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(alive_w)
            os.close(err_r)
            _child(cfg, alive_r, err_w)
        os.close(alive_r)
        os.close(err_w)
        setup_error = os.read(err_r, 4096).decode(errors="replace")  # EOF once execve succeeded
        _, wstatus, ru = os.wait4(pid, 0)
        if setup_error:
            status["setup_error"] = setup_error
        if os.WIFSIGNALED(wstatus):
            status["signal"] = os.WTERMSIG(wstatus)
        else:
            status["exit_code"] = os.WEXITSTATUS(wstatus)
        status["cpu_seconds"] = ru.ru_utime + ru.ru_stime
        status["max_rss_kb"] = ru.ru_maxrss
    except BaseException as e:
        status["setup_error"] = f"{type(e).__name__}: {e}"
    os.write(status_fd, json.dumps(status).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
