"""Run one untrusted Python program (model code + its tests) so that it can neither take the caller down nor reach
anything outside its own folder: isolated by Linux namespaces where the machine allows it, guarded otherwise.

`sandbox` chooses how (`asft-trl eval code --sandbox`):
- `auto` (default): the first isolation layer that works here (`bubblewrap`, then `unshare`; isolation.py says what
  the program can see), else the guard alone, with a loud `SandboxWarning` saying what the guard does not stop;
- `isolated`: an isolation layer, or refuse (`SandboxUnavailableError`) before anything runs;
- `bubblewrap`, `unshare`: that layer, or refuse;
- `guard`: the guard alone (warned about the same way).
Which layers work is found once per process by running a tiny program through each (cached).

Every program, isolated or not, runs as `python -I -B program.py` in a fresh temporary folder (its working folder,
HOME and TMPDIR) with the guard installed before its first line: an audit hook (`sys.addaudithook`, which cannot be
removed afterwards) that refuses writes, deletions and renames outside the folder, new processes, signals and
sockets. Keeping the guard inside the isolation makes a program's verdict the same whichever way it ran; the guard
alone is no security boundary (ctypes gets around it, and it does not stop reading files). Limits are set on the
program (`resource.setrlimit`: address space, CPU seconds, size of each file it writes, its output included; no
core dumps); a wall-clock timeout kills it and everything it started; the folder is deleted afterwards.

The verdict is `passed` only when the program runs to its last line (which prints a random token the parent chose)
and exits with status 0 within the time limit, so a sample that calls `sys.exit(0)` or `os._exit(0)` before the
tests have run fails.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import isolation, sandbox_init

SANDBOXES = ("auto", "isolated", *isolation.LAYERS, "guard")

# Installed first in the child: every audited write/delete/spawn/signal/socket must stay inside the sandbox folder.
_GUARD = r"""
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_REFUSED_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork", "os.forkpty",
                   "pty.spawn", "os.kill", "os.killpg", "socket.__new__"}
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
    elif event in _REFUSED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
_sys.addaudithook(_guard)
del _guard
"""

# What the guard alone leaves open, said wherever it is used without isolation
GUARD_LIMITS = (
    "The guard refuses writes outside the program's folder, new processes, signals and sockets from Python code, "
    "but it does not stop a program from reading any file this user can read (a Hub token under "
    "~/.cache/huggingface, SSH keys, .env files) and printing it into the results, and ctypes gets around all of it "
    "(network, other processes, a fork bomb)."
)
_HOW_TO_ISOLATE = (
    "To isolate generated code, install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`) or allow user namespaces "
    "(`sysctl kernel.unprivileged_userns_clone=1`, `user.max_user_namespaces` > 0; Ubuntu 24.04 restricts them "
    "for unshare but not for bubblewrap)"
)


class SandboxWarning(UserWarning):
    """Model-generated code is about to run without an isolation layer."""


class SandboxUnavailableError(RuntimeError):
    """The isolation asked for does not work on this machine."""


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the tail of stderr (or why it timed out)


def unavailable_reason(layer: str) -> str | None:
    """None when `layer` runs programs on this machine; otherwise why not (cached per PATH)."""
    if layer not in isolation.LAYERS:
        raise ValueError(f"{layer!r} is not an isolation layer; use one of {', '.join(isolation.LAYERS)}.")
    return _probe(layer, os.environ.get("PATH", ""))


@functools.cache
def _probe(layer: str, path: str) -> str | None:
    executable = isolation.EXECUTABLES[layer]
    if shutil.which(executable, path=path) is None:
        return f"`{executable}` is not installed (not on PATH)"
    result = run_in_layer("print('ok')", layer, timeout=20.0, memory_mb=1024, file_mb=1)
    if result.passed:
        return None
    reason = result.detail.strip().splitlines()[-1] if result.detail.strip() else result.status
    return f"`{executable}` is installed but cannot run a program here ({reason})"


def choose_layer(sandbox: str = "auto") -> str:
    """The layer programs will run in: `bubblewrap`, `unshare` or `guard`. Refuses (`SandboxUnavailableError`) when
    the isolation asked for is not available, and warns (`SandboxWarning`) whenever programs run unisolated."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox={sandbox!r} is not supported; use one of {', '.join(SANDBOXES)}.")
    if sandbox == "guard":
        warnings.warn(
            f"sandbox='guard': model-generated code runs WITHOUT ISOLATION, as asked. {GUARD_LIMITS}",
            SandboxWarning,
            stacklevel=1,  # from this line, so shown once per run however many callers choose
        )
        return "guard"
    layers = isolation.LAYERS if sandbox in ("auto", "isolated") else (sandbox,)
    reasons = {}
    for layer in layers:
        reason = unavailable_reason(layer)
        if reason is None:
            return layer
        reasons[layer] = reason
    why = "; ".join(f"{layer}: {reason}" for layer, reason in reasons.items())
    if sandbox == "auto":
        warnings.warn(
            f"Model-generated code runs WITHOUT ISOLATION: no isolation layer works on this machine ({why}). "
            f"{GUARD_LIMITS} {_HOW_TO_ISOLATE}; `--sandbox isolated` refuses to run without them.",
            SandboxWarning,
            stacklevel=1,  # from this line, so shown once per run however many callers choose
        )
        return "guard"
    raise SandboxUnavailableError(
        f"sandbox={sandbox!r}: no isolation to run model-generated code in ({why}). {_HOW_TO_ISOLATE}, or pass "
        "`--sandbox auto` to fall back to the audit-hook guard, which is no isolation."
    )


def run_program(
    program: str, timeout: float = 10.0, memory_mb: int = 2048, file_mb: int = 16, sandbox: str = "auto"
) -> ExecutionResult:
    """Execute `program` as a script in a throw-away folder, isolated as `sandbox` says (see the module docstring);
    never raises for anything the program does."""
    return run_in_layer(program, choose_layer(sandbox), timeout, memory_mb, file_mb)


def run_in_layer(
    program: str, layer: str, timeout: float = 10.0, memory_mb: int = 2048, file_mb: int = 16
) -> ExecutionResult:
    """`run_program` in a layer already chosen (`choose_layer`: `bubblewrap`, `unshare` or `guard`)."""
    limits = {"memory_mb": memory_mb, "cpu_seconds": max(1, int(timeout) + 1), "file_mb": file_mb}
    with tempfile.TemporaryDirectory(prefix="asft-eval-", ignore_cleanup_errors=True) as base:
        # `base` holds the program's folder, its output and (unshare) the new root's mount point
        folder = Path(base) / "work"
        folder.mkdir()
        script = folder / "program.py"
        token = secrets.token_hex(16)
        script.write_text(f"{_GUARD}\n{program}\n\nprint({token!r}, flush=True)\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(folder),
            "TMPDIR": str(folder),
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }
        argv = [sys.executable, "-I", "-B", str(script)]
        preexec = None
        if layer == "guard":
            command, preexec = argv, functools.partial(sandbox_init.set_limits, limits)  # between fork and exec
        elif layer == "bubblewrap":
            command = isolation.bubblewrap_command(argv, str(folder), limits)
        else:
            (Path(base) / "root").mkdir()
            command = isolation.unshare_command(argv, str(folder), limits, root=str(Path(base) / "root"))
        # Output goes to files, so the file-size limit caps it too (a program printing without end fails, and
        # never fills the evaluator's memory), and nothing the program leaves running can keep a pipe open
        stdout_path, stderr_path = Path(base) / "stdout", Path(base) / "stderr"
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group, so a timeout kills everything it started
                preexec_fn=preexec,
            )
            try:
                process.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)  # anything left behind in the group (a daemon it managed to start) goes too
        tail = _tail(stderr_path, 2000).decode("utf-8", "replace")
        if timed_out:
            return ExecutionResult(False, "timeout", f"no result within {timeout:g}s")
        if process.returncode == 0 and token.encode() in _tail(stdout_path, 4096):
            return ExecutionResult(True, "passed", tail)
        return ExecutionResult(False, "failed", tail or f"exit status {process.returncode} before the tests finished")


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
