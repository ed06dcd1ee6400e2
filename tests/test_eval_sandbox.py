"""The sandbox against hostile programs: each attack of issue 12 must fail to escape, in bounded time.

The attacks go around the Python-level guards (``posix``, ``_io``, ``ctypes``), so only the
OS-level isolation (bubblewrap) stops them; they are skipped, with the reason, where it cannot run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eval import bubblewrap, cli
from eval.sandbox import Limits, SandboxUnavailable, run_python

LIMITS = Limits(timeout_s=10, disk_mb=8)
isolated = pytest.mark.skipif(bubblewrap.problem() is not None, reason=f"no OS-level sandbox: {bubblewrap.problem()}")


def attack(code: str, limits: Limits = LIMITS):
    """Run `code` under bubblewrap; it must end by itself well before the timeout."""
    result = run_python(code, limits)
    assert result.sandbox == "bubblewrap" and result.status != "timeout", result
    assert result.seconds < limits.timeout_s / 2, result
    return result


@pytest.fixture
def bound_dir() -> Iterator[Path]:
    """A host directory the program can see (inside the Python installation, bound read-only)."""
    path = Path(sys.base_prefix) / f"eval-sandbox-test-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@isolated
@pytest.mark.parametrize("how", [
    "import posix\nfd = posix.open({path!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\nposix.write(fd, b'x')\n",
    "import _io\n_io.open({path!r}, 'w').write('x')\n",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.open({path!r}.encode(), 0o101, 0o644) >= 0\n",
])
def test_no_writes_outside_its_directory(how: str, bound_dir: Path, tmp_path: Path) -> None:
    for path in (bound_dir / "escaped", tmp_path / "escaped"):
        result = attack(how.format(path=str(path)))
        assert result.status == "failed" and not path.exists(), result


@isolated
@pytest.mark.parametrize("how", ["import posix\nposix.unlink({path!r})\n", "import posix\nposix.rename({path!r}, {path!r} + '.x')\n",
                                 "import ctypes\nassert ctypes.CDLL(None).unlink({path!r}.encode()) == 0\n"])
def test_no_deletions_outside_its_directory(how: str, bound_dir: Path, tmp_path: Path) -> None:
    for victim in (bound_dir / "victim", tmp_path / "victim"):
        victim.write_text("keep me")
        result = attack(how.format(path=str(victim)))
        assert result.status == "failed" and victim.read_text() == "keep me", result


@isolated
def test_no_shell_commands(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = attack(f"import posix\nassert posix.system('touch {marker}') == 0\n")
    assert result.status == "failed" and not marker.exists()


@isolated
def test_a_fork_bomb_makes_no_process() -> None:
    result = attack("import posix\nmade = 0\nfor _ in range(10000):\n    try:\n        pid = posix.fork()\n"
                    "    except OSError:\n        continue\n    if pid == 0:\n        while True:\n            pass\n"
                    "    made += 1\nprint(made)\n")
    assert result.passed and result.stdout.strip() == "0"


@isolated
def test_threads_still_work() -> None:
    assert attack("import threading\nt = threading.Thread(target=print, args=('hi',))\nt.start()\nt.join()\n").passed


@isolated
def test_no_daemon_outlives_the_run() -> None:
    marker = f"31.{uuid.uuid4().int % 10**8}"  # a unique `sleep` argument to find it among the host's processes
    result = attack("import posix\nfor spawn in (lambda: posix.fork(), lambda: posix.posix_spawn("
                    f"'/usr/bin/sleep', ['sleep', '{marker}'], {{}})):\n    try:\n        pid = spawn()\n"
                    "    except OSError as err:\n        print('refused', err)\n        continue\n"
                    f"    if pid == 0:\n        posix.setsid()\n        posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n")
    assert result.stdout.count("refused") == 2, result
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert left == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@isolated
def test_cannot_signal_the_evaluator_or_its_neighbours(monkeypatch, tmp_path: Path) -> None:
    # Never `kill(-1)` here: outside a working sandbox, as root, it kills every process on the machine.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    neighbour = subprocess.Popen(["sleep", "30"])
    try:
        result = attack(f"import posix\nfor pid in ({os.getpid()}, {neighbour.pid}, {os.getppid()}):\n    try:\n"
                        "        posix.kill(pid, 9)\n    except OSError as err:\n        print(pid, err)\n")
        assert neighbour.poll() is None, result  # the evaluator is alive too: this test runs in it
        assert list(tmp_path.iterdir()) == []  # and the program's directory is gone
    finally:
        neighbour.kill()
        neighbour.wait()


@isolated
def test_no_network_to_the_hosts_loopback() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = attack(
            "import _socket, ctypes, posix\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "for pid in [p for p in posix.listdir('/proc') if p.isdigit()] + ['self']:\n"
            "    try:\n        fd = posix.open(f'/proc/{pid}/ns/net', posix.O_RDONLY)\n"
            "        print('setns', pid, libc.setns(fd, 0x40000000), ctypes.get_errno())\n    except OSError:\n        pass\n"
            f"s = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('CONNECTED')\n")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.status == "failed" and "CONNECTED" not in result.stdout, result


@isolated
def test_no_environment_leaks(monkeypatch) -> None:
    monkeypatch.setenv("EVAL_SANDBOX_SECRET", "s3cret-value")
    result = attack(f"import posix\nfor pid in [p for p in posix.listdir('/proc') if p.isdigit()] + ['{os.getpid()}']:\n"
                    "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError as err:\n"
                    "        print(pid, err)\nprint(dict(posix.environ))\n")
    assert result.passed and "b'" in result.stdout  # it read its own processes' environments
    assert "s3cret" not in result.stdout + result.stderr


@isolated
def test_the_disk_cannot_be_filled() -> None:
    """Its directory is a tmpfs of `disk_mb`; nothing else is writable."""
    result = attack("import posix\nwritten = 0\ntry:\n    for i in range(1000):\n"
                    "        fd = posix.open(f'f{i}', posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
                    "        posix.write(fd, bytes(2**20))\n        posix.close(fd)\n        written += 1\n"
                    "except OSError as err:\n    print(err)\nprint(written)\n"
                    "for path in ('/', '/dev/shm', '/tmp', '/usr', '/proc'):\n    try:\n"
                    "        posix.open(path + '/x', posix.O_WRONLY | posix.O_CREAT, 0o644)\n        print('WROTE', path)\n"
                    "    except OSError as err:\n        print(path, err)\n")
    assert result.passed and "No space left" in result.stdout and "WROTE" not in result.stdout, result
    assert int(result.stdout.splitlines()[1]) <= LIMITS.disk_mb


def test_refuses_without_isolation_unless_unsafe(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(bubblewrap, "problem", lambda: "`bwrap` (bubblewrap) is not installed")
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*not installed.*--unsafe_sandbox"):
        run_python("print('hi')\n")
    assert run_python("print('hi')\n", unsafe=True).sandbox == "unsafe"
    code = cli.main(["humaneval", "--model", str(tmp_path / "never-loaded"), "--data", str(tmp_path / "x.jsonl")])
    assert code == 2 and "--unsafe_sandbox" in capsys.readouterr().err  # refused before the model or data


def test_seccomp_filter_names_unknown_architectures() -> None:
    with pytest.raises(ValueError, match="`riscv64`"):
        bubblewrap.seccomp_filter("riscv64")
    assert len(bubblewrap.seccomp_filter("aarch64")) % 8 == 0

