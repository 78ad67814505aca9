"""The first process of an isolated sandbox (pid 1 of its own pid namespace): it runs the program, holds its number
of processes down, and hands back its exit status. Under `unshare` it first builds the program's read-only world
itself (bubblewrap builds it before starting this script).

Trusted code of asft-trl, run by path as `python -I -B sandbox_init.py CONFIG_JSON`, so it uses the standard
library only. Being pid 1 is what makes it a supervisor the program can't get rid of: the kernel drops signals sent
to pid 1 from inside its namespace unless pid 1 handles them, and when pid 1 exits the kernel kills every process
left in the namespace, so nothing the program starts outlives it (a timeout that kills this process kills them all).

CONFIG_JSON (written by `isolation.py`):
    argv: the program's command line; cwd: its working folder;
    limits: {"memory_mb", "cpu_seconds", "file_mb"} (rlimits set on the program only);
    max_processes: processes allowed in the namespace, this one included; more, and all of them are ended;
    root (unshare only): an empty folder to build the new root on, with `symlinks` ([path, target]),
        `read_only` (paths bound read-only), `writable` (paths bound read-write) and `devices` (device files).
"""

import ctypes
import errno
import functools
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
# Flags of a mount that a user namespace may not clear when it remounts a bind of it: a remount must repeat them
# (statvfs flag, mount flag); getattr: sandbox.py imports `set_limits` from here on any system
_LOCKED_FLAGS = [
    (getattr(os, "ST_NOSUID", 0), MS_NOSUID),
    (getattr(os, "ST_NODEV", 0), MS_NODEV),
    (getattr(os, "ST_NOEXEC", 0), MS_NOEXEC),
    (getattr(os, "ST_NOATIME", 0), 1024),  # MS_NOATIME
    (getattr(os, "ST_NODIRATIME", 0), 2048),  # MS_NODIRATIME
    (getattr(os, "ST_RELATIME", 0), 1 << 21),  # MS_RELATIME
]
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
POLL_SECONDS = 0.01
EXIT_SETUP_FAILED = 126  # the sandbox could not be built; the program never ran


@functools.cache
def _libc():
    """Linux's mount(2) and prctl(2), loaded where they are used (only ever inside a sandbox, on Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _say(message: str) -> None:
    os.write(2, f"sandbox: {message}\n".encode())


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    encode = lambda value: None if value is None else os.fsencode(value)  # noqa: E731
    if _libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source or ''} on {target}: {os.strerror(code)}")


def _locked_flags(path: str) -> int:
    found = os.statvfs(path).f_flag
    return sum(mount_flag for stat_flag, mount_flag in _LOCKED_FLAGS if found & stat_flag)


def _bind(root: str, path: str, read_only: bool, devices: bool = False) -> None:
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(path, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | _locked_flags(path)
    flags |= (MS_RDONLY if read_only else 0) | (0 if devices else MS_NODEV)
    _mount(None, target, None, flags)


def build_root(config: dict) -> None:
    """A new root holding only what the program may see, read-only except its own folder; then chroot into it.

    Runs as root of the new user namespace (full capabilities there, none outside), in the new mount namespace, so
    no mount made here is seen by the host.
    """
    root = config["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for path, target in config["symlinks"]:  # merged /usr: /bin -> usr/bin
        os.symlink(target, root + path)
    for path in config["read_only"]:
        _bind(root, path, read_only=True)
    for path in config["writable"]:
        _bind(root, path, read_only=False)
    for path in config["devices"]:
        _bind(root, path, read_only=False, devices=True)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    try:  # no nested user namespaces (bubblewrap's --disable-userns); an older kernel without the knob only loses this
        with open(root + "/proc/sys/user/max_user_namespaces", "w") as knob:
            knob.write("0")
    except OSError:
        pass
    # /proc read-only: the program's user id may be the host's root, which the kernel lets write global sysctls
    _mount(None, root + "/proc", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/")


def _drop_capabilities() -> None:
    """Empty the bounding set and forbid gaining privileges, so the program starts with no capability at all."""
    libc = _libc()
    capability = 0
    while libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) == 0:
        capability += 1
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability this kernel knows
        raise OSError(ctypes.get_errno(), "could not drop capabilities")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "could not set no_new_privs")


def set_limits(limits: dict) -> None:
    """The program's rlimits: address space, CPU seconds, size of each file it writes (its output too), no core."""
    memory = limits["memory_mb"] * 1024 * 1024
    files = limits["file_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def start_program(config: dict, drop_capabilities: bool) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        set_limits(config["limits"])
        if drop_capabilities:
            _drop_capabilities()
        for name in ("SIGPIPE", "SIGXFSZ", "SIGINT"):  # as subprocess does for any child
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.chdir(config["cwd"])
        os.execv(config["argv"][0], config["argv"])
    except BaseException as error:  # noqa: BLE001 - anything here means the program never started
        _say(f"could not start the program: {error}")
    os._exit(EXIT_SETUP_FAILED)


def count_processes() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def supervise(program: int, max_processes: int) -> int:
    """Reap every process (orphans come to pid 1) until the program exits, and end everything if the namespace
    holds more than `max_processes`. Returns the exit code to leave with."""
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return EXIT_SETUP_FAILED
            if pid == 0:
                break
            if pid == program:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
        if count_processes() > max_processes:
            _say(f"the program started more than {max_processes - 1} processes; all of them were ended")
            return 128 + signal.SIGKILL
        signal.sigtimedwait([signal.SIGCHLD], POLL_SECONDS)


def main() -> None:
    config = json.loads(sys.argv[1])
    if os.getpid() != 1:
        _say("sandbox_init.py must be pid 1 of a new pid namespace")
        os._exit(EXIT_SETUP_FAILED)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # with no handler, pid 1 gets no signal from inside
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # woken by sigtimedwait, not by a handler
    try:
        if config.get("root"):
            build_root(config)
    except OSError as error:
        _say(f"could not build the sandbox: {error}")
        os._exit(EXIT_SETUP_FAILED)
    program = start_program(config, drop_capabilities=bool(config.get("root")))
    # Leaving pid 1 ends the namespace: the kernel kills whatever the program left behind
    os._exit(supervise(program, config["max_processes"]))


if __name__ == "__main__":
    main()
