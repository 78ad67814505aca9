"""Hostile model-generated programs, run through the code suite's scorer in each sandbox: a socket to 127.0.0.1,
reading a secret planted outside the program's folder, a fork bomb, a memory bomb, an output flood, writing
outside, killing the evaluator. Each must be contained, reported as failed, and the evaluation must go on.

Isolated (bubblewrap, unshare), the programs also try through ctypes, which gets around the audit-hook guard: only
the namespaces stop them. The guard alone stops the Python-level ones; what it cannot stop (reading files, ctypes)
is not pretended contained: its warning says so, and `sandbox="isolated"` refuses to run without isolation.

A layer whose tool is missing here is skipped, unless ASFT_TEST_SANDBOXES names it (CI names both: `.ci/run`).
"""

from __future__ import annotations

import json
import os
import socket
import string
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from asft_trl.evaluation import sandbox
from asft_trl.evaluation.isolation import INIT, MAX_PROCESSES, visible_paths
from asft_trl.evaluation.sandbox import SandboxUnavailableError, SandboxWarning, choose_layer, run_program

LAYERS = ("bubblewrap", "unshare")
REQUIRED = {name for name in os.environ.get("ASFT_TEST_SANDBOXES", "").split(",") if name}


def require(layer: str) -> None:
    reason = sandbox.unavailable_reason(layer)
    if reason is not None:
        (pytest.fail if layer in REQUIRED else pytest.skip)(f"{layer}: {reason}")


# Templates ($names filled in by the evaluator process): stopped by the guard, and by isolation
PYTHON_LEVEL = {
    "socket": """
        import socket
        with socket.create_connection(("127.0.0.1", $port), timeout=2) as connection:
            connection.sendall(b"stolen")
    """,
    "fork_bomb": """
        import os
        while True:
            os.fork()
    """,
    "memory_bomb": """
        hoard = []
        while True:
            hoard.append(bytearray(128 * 1024 * 1024))
    """,
    "output_flood": """
        import sys
        while True:
            sys.stdout.write("x" * 1048576)
    """,
    "write_outside": """
        open($outside, "w").write("escaped")
    """,
    "kill_parent": """
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
    """,
    "kill_evaluator": """
        import os, signal
        os.kill($evaluator_pid, signal.SIGKILL)
    """,
}
# Get around the guard (reading is not guarded; ctypes is below the audit hook): only isolation stops them
AROUND_THE_GUARD = {
    "read_secret": """
        import sys
        stolen = []
        for path in ($secret, "/proc/$evaluator_pid/root" + $secret):
            try:
                stolen.append(open(path).read())
            except OSError as error:
                print(error, file=sys.stderr)
        if not stolen:
            raise SystemExit("nothing to steal")
        print("stolen:", stolen, file=sys.stderr)
    """,
    "socket_ctypes": """
        import ctypes, os, struct
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
        address = struct.pack("=H", 2) + struct.pack("!H", $port) + bytes([127, 0, 0, 1]) + bytes(8)
        if fd < 0 or libc.connect(fd, address, len(address)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.send(fd, b"stolen", 6, 0)
    """,
    "fork_bomb_ctypes": """
        import ctypes, time
        libc = ctypes.CDLL(None)
        for _ in range(8):  # up to 256 processes, should the process limit fail
            libc.fork()
        time.sleep(60)
    """,
    "write_outside_ctypes": """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open($outside.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.write(fd, b"escaped", 7)
    """,
    "write_python_ctypes": """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open($python_file.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.write(fd, b"escaped", 7)
    """,
    "daemon_ctypes": """
        import ctypes, time
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:  # a daemon in a session of its own, out of reach of a process-group kill
            libc.setsid()
            libc.prctl(15, $marker.encode(), 0, 0, 0)  # PR_SET_NAME, to be found afterwards
        time.sleep(60)  # until the timeout
    """,
    "kill_parent_ctypes": """
        import ctypes, os, signal, time
        libc = ctypes.CDLL(None)
        libc.kill(os.getppid(), signal.SIGKILL)
        libc.kill($evaluator_pid, signal.SIGKILL)
        time.sleep(0.5)
        raise SystemExit("still here, and so is the evaluator")
    """,
}
GOOD = "print(sum([1, 2]))"

# Scores the programs in a process of its own, so a program that killed its evaluator would show as a crash here
EVALUATOR = """
import json, os, string, sys, warnings
from asft_trl.evaluation.code import score_rows
spec = json.loads(sys.argv[1])
values = {**spec["values"], "evaluator_pid": os.getpid()}
rows = [{"id": name, "prompt": "", "test": "", "mode": "write", "prediction": string.Template(code).substitute(values)}
        for name, code in spec["programs"].items()]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    metrics, scored = score_rows(rows, timeout=5, memory_mb=512, workers=2, sandbox=spec["sandbox"])
print(json.dumps({"metrics": metrics, "rows": {row["id"]: row for row in scored},
                  "warnings": [str(w.message) for w in caught]}))
"""


class Listener:
    """A TCP server on 127.0.0.1 that records whatever reaches it."""

    def __enter__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.received, self.connections, self.done = b"", 0, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self):
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            with connection:
                connection.settimeout(1)
                try:
                    self.received += connection.recv(100)
                except OSError:
                    pass

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.server.close()


def evaluate(programs: dict[str, str], mode: str, values: dict) -> dict:
    programs = {name: textwrap.dedent(code) for name, code in programs.items()}
    spec = json.dumps({"programs": {**programs, "good": GOOD}, "values": values, "sandbox": mode})
    done = subprocess.run([sys.executable, "-c", EVALUATOR, spec], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the evaluator died (status {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def targets(tmp_path):
    """What the programs go after: a secret outside their folder, paths to write, a file in the Python install."""
    secret = tmp_path / "hub_token"
    secret.write_text(f"hf_{uuid.uuid4().hex}")
    python_file = Path(sys.prefix) / f"asft-sandbox-escape-{uuid.uuid4().hex}.txt"
    marker = f"leak{uuid.uuid4().hex[:10]}"  # a process name (15 characters at most)
    yield {"secret": secret, "outside": tmp_path / "escaped.txt", "python_file": python_file, "marker": marker}
    python_file.unlink(missing_ok=True)  # only there if a test failed


def values_for(targets: dict, port: int) -> dict:
    return {"port": port, **{name: repr(str(path)) for name, path in targets.items()}}


def processes_named(name: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(entry.name)
        except OSError:
            pass
    return found


def assert_nothing_escaped(report: dict, targets: dict, listener: Listener) -> None:
    assert listener.connections == 0 and listener.received == b""
    assert not targets["outside"].exists() and not targets["python_file"].exists()
    assert processes_named(str(targets["marker"])) == []  # nothing left running
    assert targets["secret"].read_text() not in json.dumps(report)
    assert report["rows"]["good"]["passed"], report["rows"]["good"]  # the evaluation went on after every attack


@pytest.mark.parametrize("layer", LAYERS)
def test_isolated_hostile_programs_are_contained_and_fail(layer, targets):
    require(layer)
    with Listener() as listener:
        report = evaluate({**PYTHON_LEVEL, **AROUND_THE_GUARD}, layer, values_for(targets, listener.port))
    assert_nothing_escaped(report, targets, listener)
    rows = report["rows"]
    hostile = {name: row for name, row in rows.items() if name != "good"}
    statuses = {name: row["status"] for name, row in hostile.items()}
    assert statuses == {name: "timeout" if name == "daemon_ctypes" else "failed" for name in hostile}, statuses
    assert report["metrics"]["sandbox"] == layer and report["warnings"] == []
    errors = {name: row["error"] for name, row in hostile.items()}
    # The guard still answers first where it can: the verdicts are the same as without isolation
    assert "socket.__new__ is not allowed" in errors["socket"]
    assert "os.fork is not allowed" in errors["fork_bomb"]
    assert "MemoryError" in errors["memory_bomb"]
    assert "File too large" in errors["output_flood"]
    assert "writing outside the sandbox folder" in errors["write_outside"]
    assert "os.kill is not allowed" in errors["kill_parent"] and "os.kill is not allowed" in errors["kill_evaluator"]
    # Below the guard, the namespaces: nothing of the host to see, reach, write or signal
    assert "No such file or directory" in errors["read_secret"] and "nothing to steal" in errors["read_secret"]
    assert "Network is unreachable" in errors["socket_ctypes"] or "Connection refused" in errors["socket_ctypes"]
    assert f"more than {MAX_PROCESSES - 1} processes" in errors["fork_bomb_ctypes"]
    assert "No such file or directory" in errors["write_outside_ctypes"]
    assert "Read-only file system" in errors["write_python_ctypes"]
    assert "still here, and so is the evaluator" in errors["kill_parent_ctypes"]


def test_guard_alone_contains_the_python_level_attacks_and_warns(targets):
    with Listener() as listener:
        report = evaluate(PYTHON_LEVEL, "guard", values_for(targets, listener.port))
    assert_nothing_escaped(report, targets, listener)
    assert all(row["status"] == "failed" for name, row in report["rows"].items() if name != "good")
    assert report["metrics"]["sandbox"] == "guard"
    (warning,) = report["warnings"]
    assert "WITHOUT ISOLATION" in warning and "reading any file" in warning and "ctypes" in warning


def test_guard_alone_does_not_stop_reading_files_as_its_warning_says(targets):
    """Not a wish: the guard's limit, shown, so its warning stays true."""
    program = string.Template(textwrap.dedent(AROUND_THE_GUARD["read_secret"])).substitute(
        secret=repr(str(targets["secret"])), evaluator_pid=os.getpid()
    )
    with pytest.warns(SandboxWarning, match="reading any file"):
        result = run_program(program + "\nraise SystemExit(1)", sandbox="guard")
    assert targets["secret"].read_text() in result.detail + run_program(program, sandbox="guard").detail


@pytest.mark.parametrize("layer", LAYERS)
def test_what_an_isolated_program_sees(layer, tmp_path):
    require(layer)
    program = textwrap.dedent(f"""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        facts = {{
            "parent": os.getppid(),
            "capabilities": status["CapEff"].strip(),
            "interfaces": sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]),
            "tmp": os.listdir("/tmp"),
            "home": os.environ["HOME"] == os.getcwd(),
            "root": sorted(os.listdir("/")),
            "sees_test_folder": os.path.exists({str(tmp_path)!r}),
            "new_user_namespace": libc.unshare(0x10000000),
        }}
        # below the guard, which refuses writing outside the folder first
        facts["proc"] = "writable" if libc.open(b"/proc/sys/kernel/hostname", os.O_RDWR) >= 0 else os.strerror(
            ctypes.get_errno()
        )
        print(facts, file=sys.stderr)
        raise SystemExit(1)
    """)
    facts = eval(run_program(program, sandbox=layer).detail.strip().splitlines()[-1])  # noqa: S307 - our own output
    assert facts["parent"] == 1 and facts["capabilities"] == "0000000000000000"
    assert facts["interfaces"] == ["lo"] and facts["home"] and not facts["sees_test_folder"]
    # the system, the Python installation (wherever it lives: its top folder shows) and the program's own folder
    symlinks, read_only = visible_paths()
    # In /tmp: the program's folder, and the top folder of a bound path that lives there (a clone's .venv in CI)
    bound_in_tmp = {
        Path(p).parts[2] for p in [*read_only, INIT] if Path(p).parts[1:2] == ("tmp",) and len(Path(p).parts) > 2
    }
    own = [name for name in facts["tmp"] if name not in bound_in_tmp]
    assert len(own) == 1 and own[0].startswith("asft-eval-"), facts["tmp"]
    allowed = {"dev", "proc", "tmp"} | {Path(path).parts[1] for path in read_only + [link for link, _ in symlinks]}
    assert set(facts["root"]) <= allowed and not {"var", "run", "mnt", "srv"} & set(facts["root"]), facts["root"]
    assert facts["new_user_namespace"] == -1 and facts["proc"] == "Read-only file system"


def test_without_an_isolation_layer_auto_warns_and_isolated_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor unshare can be found
    for layer in LAYERS:
        assert "not installed" in sandbox.unavailable_reason(layer)
    with pytest.warns(SandboxWarning, match="WITHOUT ISOLATION: no isolation layer works") as caught:
        assert choose_layer("auto") == "guard"
    assert "apt-get install bubblewrap" in str(caught[0].message) and "--sandbox isolated" in str(caught[0].message)
    for refusing in ("isolated", "bubblewrap", "unshare"):
        with pytest.raises(SandboxUnavailableError, match="is not installed"):
            choose_layer(refusing)
    with pytest.warns(SandboxWarning):
        assert run_program("print(1)").passed  # the evaluation still runs, guarded


def test_a_layer_installed_but_not_working_is_passed_over_with_its_reason(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"  # as in a container that forbids namespaces
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(SandboxWarning) as caught:
        assert choose_layer("auto") == "guard"
    message = str(caught[0].message)
    assert "bubblewrap: `bwrap` is installed but cannot run a program here (bwrap: No permissions" in message
    assert "unshare: `unshare` is not installed" in message


def test_eval_cli_refuses_before_scoring_and_names_the_layer(monkeypatch, tmp_path, capsys):
    from asft_trl.scripts.cli import main as asft_main

    predictions = tmp_path / "p.jsonl"
    item = {"prompt": "", "test": "assert f() == 1", "mode": "write", "prediction": "def f():\n    return 1\n"}
    predictions.write_text(json.dumps(item) + "\n")
    scored = asft_main(["eval", "code", "--predictions", str(predictions), "--output_dir", str(tmp_path / "a")])
    assert scored == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["benchmarks"]["p"]["sandbox"] in ("bubblewrap", "unshare", "guard")
    assert results["benchmarks"]["p"]["accuracy"] == 1.0
    monkeypatch.setenv("PATH", str(tmp_path))
    refused = ["eval", "code", "--predictions", str(predictions), "--output_dir", str(tmp_path / "b")]
    with pytest.raises(SystemExit, match="sandbox='isolated': no isolation"):
        asft_main([*refused, "--sandbox", "isolated"])
    assert not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="sandbox='nope' is not supported"):
        asft_main(["eval", "code", "--predictions", str(predictions), "--sandbox", "nope"])
