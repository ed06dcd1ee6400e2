"""OS-level isolation for untrusted programs through bubblewrap (`bwrap`, Debian package `bubblewrap`).

A program started by `command` gets its own user, PID, network, IPC, UTS, cgroup and mount
namespaces. Its filesystem is a read-only view of ``/usr``, ``/lib*`` and the Python installation
(nothing else of the host: no ``/etc``, ``/home``, ``/root``, ``/tmp`` or host ``/proc``), its own
``/proc``, a minimal read-only ``/dev`` and one size-limited tmpfs, its working directory, as the
only writable place. It runs as ``nobody`` with no capabilities and ``no_new_privs``, cannot make
user namespaces, and dies with the evaluator. A seccomp filter refuses new processes (``fork``,
``vfork``, ``clone`` without ``CLONE_THREAD``, ``clone3``), so it can neither fork-bomb nor leave a
daemon behind; threads still work (glibc falls back from ``clone3`` to ``clone``).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import struct
import subprocess
import sys

# Classic BPF for seccomp: `struct sock_filter` is (u16 code, u8 jt, u8 jf, u32 k).
_LD, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
_ALLOW, _ERRNO, _KILL = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD, _X32 = 0x00010000, 0x40000000
# `struct seccomp_data`: nr at 0, arch at 4, args[0] (low half on little-endian machines) at 16.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
NOBODY = 65534


def seccomp_filter(machine: str | None = None) -> bytes:
    """The filter that refuses new processes (see the module docstring), for bwrap's ``--seccomp``."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise ValueError(f"no seccomp filter for the `{machine}` architecture (known: {', '.join(_SYSCALLS)})")
    arch, calls = _SYSCALLS[machine]
    body: list[tuple[int, int, int | str, int | str]] = [(_LD, 4, 0, 0), (_JEQ, arch, 0, "kill"), (_LD, 0, 0, 0)]
    if machine == "x86_64":
        body.append((_JSET, _X32, "eperm", 0))  # the x32 ABI's numbers are another way in
    body += [(_JEQ, calls[name], "eperm", 0) for name in ("fork", "vfork") if name in calls]
    body += [(_JEQ, calls["clone3"], "enosys", 0), (_JEQ, calls["clone"], 0, "allow"),
             (_LD, 16, 0, 0), (_JSET, _CLONE_THREAD, "allow", "eperm")]
    tail = {"eperm": _ERRNO | _EPERM, "enosys": _ERRNO | _ENOSYS, "allow": _ALLOW, "kill": _KILL}
    where = {label: len(body) + i for i, label in enumerate(tail)}

    def offset(target: int | str, index: int) -> int:
        return target if isinstance(target, int) else where[target] - index - 1

    code = [struct.pack("=HBBI", op, offset(jt, i), offset(jf, i), k) for i, (op, k, jt, jf) in enumerate(body)]
    return b"".join(code + [struct.pack("=HBBI", _RET, 0, 0, k) for k in tail.values()])


def _readable() -> list[str]:
    """Host paths bound read-only: the system libraries and the Python installation, outermost first."""
    paths = [p for p in ("/usr", "/lib", "/lib32", "/lib64", "/libx32") if os.path.lexists(p)]
    for prefix in sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                          sys.base_exec_prefix, os.path.dirname(sys.executable))}):
        if not any(prefix == p or prefix.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(prefix)
    for link in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)):  # a venv path may be a symlink
        if os.path.islink(link) and link not in paths:
            paths.append(link)
    return paths


def command(argv: list[str], workdir: str, disk_bytes: int, seccomp_fd: int) -> list[str]:
    """The bwrap command line that runs `argv` in `workdir`, a fresh tmpfs of `disk_bytes`."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns",
           "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--seccomp", str(seccomp_fd)]
    for path in _readable():
        cmd += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(disk_bytes), "--tmpfs", workdir, "--remount-ro", "/", "--chdir", workdir, "--", *argv]
    return cmd


def seccomp_pipe() -> int:
    """A pipe's read end holding the filter, for ``--seccomp`` (the caller passes it on and closes it)."""
    data = seccomp_filter()
    read, write = os.pipe()
    try:
        os.write(write, data)  # a few hundred bytes: always fits in the pipe buffer
    finally:
        os.close(write)
    return read


@functools.cache
def problem() -> str | None:
    """Why bubblewrap cannot isolate programs here, or None when it can (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "`bwrap` (bubblewrap) is not installed: `apt-get install bubblewrap`"
    try:
        seccomp_filter()
    except ValueError as err:
        return str(err)
    workdir = "/sandbox-probe"
    fd = seccomp_pipe()
    try:
        probe = subprocess.run(command([sys.executable, "-I", "-c", "pass"], workdir, 2**20, fd), pass_fds=(fd,),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap did not start: {err}"
    finally:
        os.close(fd)
    if probe.returncode != 0:
        lines = (probe.stderr.strip() or f"exit status {probe.returncode}").splitlines()
        return f"bubblewrap cannot create its namespaces here ({lines[-1]})"
    return None
