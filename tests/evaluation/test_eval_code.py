"""Code execution: right code passes, wrong code fails, a hang times out, a crash or early exit fails only its own
problem, and nothing the code writes lands outside its temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asft_trl.evaluation.code import build_program, extract_code, score_rows
from asft_trl.evaluation.sandbox import run_program

ADD = {
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "mode": "complete",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def row(prediction: str, item=ADD, **extra) -> dict:
    return {**item, "prediction": [prediction], **extra}


def test_correct_wrong_hang_crash_exit_each_fail_only_their_problem(tmp_path):
    rows = [
        row("    return a + b\n"),  # body continuation
        row("```python\ndef add(a, b):\n    return b + a\n```"),  # fenced whole function
        row("    return a - b\n"),  # wrong
        row("    while True:\n        pass\n"),  # hangs
        row("    raise RuntimeError('boom')\n"),  # crashes
        row("    import sys; sys.exit(0)\n"),  # exits "successfully" before the tests
        row("import os\nos._exit(0)\n", item={**ADD, "mode": "write"}),  # hard exit at import
        row("    return a + b\n"),  # a correct one after all the bad ones still passes
    ]
    metrics, scored = score_rows(rows, timeout=3, workers=2)
    assert [r["passed"] for r in scored] == [True, True, False, False, False, False, False, True]
    assert scored[3]["status"] == "timeout" and metrics["timeouts"] == 1
    assert metrics["accuracy"] == pytest.approx(3 / 8)


def test_mbpp_style_item_writes_the_whole_function():
    item = {"prompt": '"""\nsquare\n"""\n', "test": "assert square(3) == 9", "entry_point": "square", "mode": "write"}
    assert score_rows([row("def square(x):\n    return x * x\n", item=item)])[0]["accuracy"] == 1.0
    assert score_rows([row("def square(x):\n    return x + x\n", item=item)])[0]["accuracy"] == 0.0


def test_plain_completion_stops_at_a_new_top_level_statement():
    code = extract_code(ADD, "    return a + b\n\nprint(add(1))\nassert False\n")
    assert code == ADD["prompt"] + "    return a + b\n"
    assert build_program(ADD, code).rstrip().endswith("check(add)")


def test_writes_stay_inside_the_temporary_folder(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_program(f"open({str(outside)!r}, 'w').write('x')")
    assert not result.passed and "outside the sandbox" in result.detail and not outside.exists()
    parent_escape = run_program("open('../escaped.txt', 'w').write('x')")
    assert not parent_escape.passed
    assert run_program(
        "import os\nos.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('x')\nos.remove('a/b/f.txt')"
    ).passed
    assert not run_program(f"import os\nos.remove({str(Path(__file__))!r})").passed
    assert Path(__file__).exists()
    assert not run_program("import os\nos.system('true')").passed
    # the program's own folder is removed afterwards
    result = run_program("import os\nprint(os.getcwd(), file=__import__('sys').stderr)\nraise SystemExit(1)")
    assert not os.path.exists(result.detail.strip().splitlines()[0])


def test_memory_limit_fails_the_problem():
    result = run_program("x = bytearray(8 * 1024 ** 3)", memory_mb=512)
    assert not result.passed and "MemoryError" in result.detail


def test_rows_without_tests_are_refused():
    with pytest.raises(ValueError, match="test"):
        score_rows([{"prediction": "x", "prompt": "p", "mode": "write"}])
