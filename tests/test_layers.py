"""The package's layers (docs/architecture.md) hold: each folder imports only the layers below it, the quickstart
demo plugs into the libraries without their importing it, and nothing in the package imports the repository's
`studies/` (they use the package, never the reverse). Parsed with `ast`, so an import inside a function counts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asft_trl"

# Which of the package's own layers each layer may import (itself always). `scripts` is the application: it may import
# anything, and nothing else imports it. Keep in step with docs/architecture.md.
ALLOWED = {
    "losses": set(),
    "utils": set(),
    "reference": {"losses", "utils"},
    "data": {"utils"},
    "diagnostics": {"losses", "reference", "utils"},
    "evaluation": {"data", "utils"},
    "trainer": {"losses", "reference", "data", "diagnostics", "utils"},
    "quickstart": {"data", "evaluation", "utils"},
    "scripts": {"losses", "reference", "data", "diagnostics", "evaluation", "trainer", "quickstart", "utils"},
    "__init__": {"losses", "trainer"},
}
# The loss is pure functions of tensors: torch and the standard library only
LOSSES_MAY_NOT_IMPORT = {"transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "numpy"}
# The repository's folders beside the package, which it must never import (they are not installed with it)
OUTSIDE_THE_PACKAGE = {"studies", "benchmarks", "tests", "tiny", "conftest"}


def _layer_and_package(path: Path) -> tuple[str, str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    module = ".".join(parts)
    return (parts[1] if len(parts) > 1 else "__init__"), (module if is_package else module.rsplit(".", 1)[0])


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    _, package = _layer_and_package(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module))
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                found.append((node.lineno, ".".join([*base, node.module])))
            else:  # `from .. import x`: x may be a module
                found += [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]
    return found


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer, _ = _layer_and_package(path)
        if layer not in ALLOWED:
            problems.append(
                f"{path}: the folder {layer!r} is no layer of docs/architecture.md; add it to ALLOWED there"
            )
            continue
        for line, module in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            if module.split(".")[0] == "asft_trl":
                target = _layer_of(module)
                if target != layer and target not in ALLOWED[layer]:
                    problems.append(f"{where}, but {layer} may import only {sorted(ALLOWED[layer]) or 'itself'}")
            elif module.split(".")[0] in OUTSIDE_THE_PACKAGE:
                problems.append(f"{where}: the package never imports the repository's {module.split('.')[0]}/")
            elif layer == "losses" and module.split(".")[0] in LOSSES_MAY_NOT_IMPORT:
                problems.append(f"{where}: the loss imports only torch")
    return problems


def test_every_layer_imports_only_the_layers_below_it():
    assert _violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a loss module that imported the trainer would be reported."""
    fake = tmp_path / "asft_trl"
    (fake / "losses").mkdir(parents=True)
    (fake / "losses" / "bad.py").write_text(
        "def f():\n    from ..trainer import ASFTTrainer\n    import transformers\n"
    )
    (fake / "scripts").mkdir()
    (fake / "scripts" / "bad.py").write_text("from studies.common import RunSpec\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    problems = _violations()
    assert len(problems) == 3 and "asft_trl.trainer" in problems[0] and "transformers" in problems[1]
    assert "scripts/bad.py:1 imports studies.common" in problems[2] and "studies/" in problems[2]


def test_the_wheel_ships_the_package_only():
    """With pyproject's package list, setuptools finds `asft_trl` and its sub-packages, never the repository's
    `studies` (nor tests, benchmarks)."""
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    found = find_packages(str(PACKAGE.parent), **pyproject["tool"]["setuptools"]["packages"]["find"])
    assert "asft_trl" in found and "asft_trl.trainer" in found
    assert not [p for p in found if not p.startswith("asft_trl")]
    assert (PACKAGE.parent / "studies" / "__init__.py").is_file()  # a package, and still left out


def test_importing_the_libraries_does_not_load_the_demo():
    """`import asft_trl` and every library module, in a fresh process: none loads the quickstart or the command
    line, so there is no cycle through the demo (it imports `evaluation`, never the reverse)."""
    libraries = ["asft_trl"] + [
        f"asft_trl.{p.parent.name}.{p.stem}"
        for layer in ("losses", "utils", "reference", "data", "diagnostics", "evaluation", "trainer")
        for p in sorted((PACKAGE / layer).glob("*.py"))
    ]
    code = (
        f"import importlib, sys\nfor m in {libraries!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('asft_trl.quickstart', 'asft_trl.scripts'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_demo_registers_itself():
    """What the libraries used to special-case, the quickstart now adds when imported (the command line imports it)."""
    import asft_trl.scripts  # noqa: F401
    from asft_trl.data.loading import GENERATED_DATASETS
    from asft_trl.evaluation.benchmarks import BENCHMARKS, TASK_METRICS
    from asft_trl.quickstart import HUB_ID, score
    from asft_trl.utils.paths import resolves_itself

    assert "asft/quickstart" in GENERATED_DATASETS
    assert BENCHMARKS["quickstart"].suite == "quickstart" and BENCHMARKS["quickstart"].generate is not None
    assert TASK_METRICS["quickstart"] is score
    assert resolves_itself(HUB_ID) and not resolves_itself("Qwen/Qwen2.5-0.5B")
