"""Run one untrusted Python program (model code + its tests) in a child process that cannot take the caller down.

Each program runs in `python -I -B` in a fresh temporary directory (its working directory, its HOME and TMPDIR),
in its own process group, with limits set in the child before it starts (`resource.setrlimit`: address space, CPU
seconds, size of files it writes, no core dumps). A wall-clock timeout kills the whole process group. Before the
program runs, an audit hook (`sys.addaudithook`, which cannot be removed afterwards) refuses writes, deletions,
renames and new processes outside the temporary directory, so relative and absolute writes alike stay inside it;
the directory is deleted afterwards. This is a guard against accidents, not a security boundary (ctypes or a C
extension can get around an audit hook): run code you do not trust in a container too.

The verdict is `passed` only when the program runs to its last line (which prints a random token the parent chose)
and exits with status 0 within the time limit, so a sample that calls `sys.exit(0)` or `os._exit(0)` before the
tests have run fails.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Installed first in the child: every audited write/delete/spawn must stay inside the sandbox folder.
_GUARD = r"""
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_SPAWN_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork", "os.forkpty",
                 "pty.spawn", "os.kill", "os.killpg"}
def _inside(path):
    if isinstance(path, int):
        return True
    try:
        path = _os.fsdecode(path)
    except TypeError:
        return False
    real = _os.path.realpath(path)
    return real == _ROOT or real.startswith(_ROOT + _os.sep)
def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox folder is not allowed: {path}")
    elif event in _PATH_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, _os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder is not allowed: {arg}")
    elif event in _SPAWN_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
_sys.addaudithook(_guard)
del _guard
"""


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the tail of stderr (or why it timed out)


def _limit_child(memory_mb: int, cpu_seconds: int, file_mb: int):
    def apply():  # runs in the child between fork and exec
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 1024 * 1024, file_mb * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 2048, file_mb: int = 16) -> ExecutionResult:
    """Execute `program` as a script in a throw-away directory; never raises for anything the program does."""
    with tempfile.TemporaryDirectory(prefix="asft-eval-") as folder:
        script = Path(folder) / "program.py"
        token = secrets.token_hex(16)
        script.write_text(f"{_GUARD}\n{program}\n\nprint({token!r}, flush=True)\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": folder,
            "TMPDIR": folder,
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(script)],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills everything it started
            preexec_fn=_limit_child(memory_mb, max(1, int(timeout) + 1), file_mb),
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return ExecutionResult(False, "timeout", f"no result within {timeout:g}s")
        finally:
            _kill_group(process)  # anything left behind in the group (a daemon it managed to start) goes too
        tail = stderr.decode("utf-8", "replace")[-2000:]
        if process.returncode == 0 and token.encode() in stdout[-4096:]:
            return ExecutionResult(True, "passed", tail)
        return ExecutionResult(False, "failed", tail or f"exit status {process.returncode} before the tests finished")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
