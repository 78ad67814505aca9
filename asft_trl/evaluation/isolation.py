"""The isolation layers a model-generated program can run in, and the command line of each.

Two layers, both Linux namespaces, both starting `sandbox_init.py` as pid 1 of a new pid namespace:
- `bubblewrap` (`bwrap`, a Debian/Ubuntu/Fedora package; Flatpak's sandbox), which builds the new root itself;
- `unshare` (util-linux, present on nearly every Linux), whose new user namespace makes the caller root of a private
  mount namespace, where `sandbox_init.py` builds the same root and drops every capability before the program starts.

Either way the program sees the system's programs and libraries, the Python that runs it and a few files of /etc,
all read-only; its own folder, the only writable place (and its HOME); a private /proc, read-only; /dev/null, zero,
random, urandom. Nothing else: of /home or /root only the Python installation, if it lives there; nothing of /tmp,
/run, /var, /mnt. It has a network namespace of its own (no interface but loopback, so no route out and nothing of
the host's to connect to), no capability, cannot create user namespaces, and cannot see or signal any process
outside its pid namespace.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LAYERS = ("bubblewrap", "unshare")
EXECUTABLES = {"bubblewrap": "bwrap", "unshare": "unshare"}
INIT = str(Path(__file__).with_name("sandbox_init.py"))
# Processes in the namespace, sandbox_init.py included. The guard refuses new processes from Python code, so only a
# program getting around it (ctypes) ever starts one.
MAX_PROCESSES = 16

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the dynamic loader, time zones and user-name lookups read; not /etc/shadow, /etc/ssh, /etc/ssl/private...
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd", "/etc/group")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@functools.cache
def visible_paths() -> tuple[list[tuple[str, str]], list[str]]:
    """(symlinks, read_only): the top-level symlinks of a merged-/usr system as [path, target], and the paths the
    program may read: the system's and the Python installation's (the venv and the interpreter it was made from).
    A path inside another one listed is left out."""
    symlinks = [(path, os.readlink(path)) for path in _SYSTEM if os.path.islink(path)]
    python = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    python.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    candidates = [p for p in _SYSTEM if os.path.isdir(p) and not os.path.islink(p)]
    candidates += [p for p in _ETC if os.path.exists(p)]
    candidates += sorted(python)
    read_only: list[str] = []
    for path in sorted(set(candidates), key=len):
        if not any(_inside(path, kept) for kept in read_only):
            read_only.append(path)
    return symlinks, read_only


def init_config(argv: list[str], cwd: str, limits: dict, root: str | None = None, writable: str | None = None) -> dict:
    config = {"argv": argv, "cwd": cwd, "limits": limits, "max_processes": MAX_PROCESSES}
    if root is not None:
        symlinks, read_only = visible_paths()
        config.update(root=root, symlinks=symlinks, read_only=read_only, writable=[writable], devices=list(_DEVICES))
    return config


@functools.cache
def _bwrap_disables_userns(bwrap: str) -> bool:
    """bubblewrap >= 0.8 can forbid nested user namespaces; older ones only lack that extra."""
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    return "--disable-userns" in help_text


def bubblewrap_command(argv: list[str], folder: str, limits: dict) -> list[str]:
    bwrap = shutil.which(EXECUTABLES["bubblewrap"])
    command = [bwrap, "--unshare-all", "--unshare-user", "--cap-drop", "ALL", "--die-with-parent", "--new-session"]
    command += ["--as-pid-1"]  # sandbox_init.py is pid 1, not bwrap's own reaper
    if _bwrap_disables_userns(bwrap):
        command += ["--disable-userns"]
    symlinks, read_only = visible_paths()
    for path, target in symlinks:
        command += ["--symlink", target, path]
    for path in [*read_only, INIT]:  # sandbox_init.py is not always inside the Python installation (editable)
        command += ["--ro-bind", path, path]
    for device in _DEVICES:
        command += ["--dev-bind", device, device]
    # /proc read-only: the program's user id may be the host's root, which the kernel lets write global sysctls
    command += ["--proc", "/proc", "--remount-ro", "/proc", "--bind", folder, folder, "--remount-ro", "/"]
    config = init_config(argv, folder, limits)
    return [*command, "--", sys.executable, "-I", "-B", INIT, json.dumps(config)]


def unshare_command(argv: list[str], folder: str, limits: dict, root: str) -> list[str]:
    """`root`: an empty folder outside `folder`, where the new root is mounted (inside the namespace only)."""
    unshare = shutil.which(EXECUTABLES["unshare"])
    namespaces = ["--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    config = init_config(argv, folder, limits, root=root, writable=folder)
    return [unshare, *namespaces, "--", sys.executable, "-I", "-B", INIT, json.dumps(config)]
