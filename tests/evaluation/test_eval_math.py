"""Math scoring: math-verify verdicts on hand-written (prediction, gold) pairs whose right verdict is known."""

from __future__ import annotations

import pytest

pytest.importorskip("math_verify")

from asft_trl.evaluation.math import is_correct, score_rows  # noqa: E402

EQUIVALENT = [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),  # fraction vs decimal
    (r"\boxed{0.5}", r"\frac12"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{[1,2)}", "[1,2)"),  # interval
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),  # MATH-style tuple
    (r"\boxed{5\text{ cm}}", "5"),  # units
    (r"\boxed{100^\circ}", "100"),
    (r"\boxed{10\%}", "10"),
    (r"\boxed{2x+2}", "2(x+1)"),  # algebraically equal
    (r"\boxed{\{1,2\}}", r"\{2,1\}"),  # sets ignore order
    ("The answer is $x=3$", "3"),  # no box: last expression
    (r"First I get 4, but correcting: \boxed{7}", "7"),  # the boxed answer wins
]
WRONG = [
    (r"\boxed{(1,2)}", "[1,2)"),  # open vs half-open interval
    (r"\boxed{1.41}", r"\sqrt{2}"),  # a rounding is not the number
    (r"\boxed{0.33}", r"\frac13"),
    (r"\boxed{-4}", "4"),
    (r"\boxed{3}", r"(3, \frac{\pi}{2})"),  # part of a tuple
    (r"\boxed{4}", "5"),
    ("I cannot solve this.", "7"),  # no answer at all
    ("", "7"),
]


@pytest.mark.parametrize("prediction, gold", EQUIVALENT)
def test_equivalent_forms_are_correct(prediction, gold):
    assert is_correct(prediction, gold)


@pytest.mark.parametrize("prediction, gold", WRONG)
def test_near_misses_are_wrong(prediction, gold):
    assert not is_correct(prediction, gold)


def test_avg_at_n_and_pass_at_n():
    rows = [
        {"prediction": [r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "none"], "answer": "2"},  # 2 of 4
        {"prediction": [r"\boxed{1}"] * 4, "answer": "0"},  # 0 of 4
    ]
    metrics, scored = score_rows(rows)
    assert metrics["accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["pass@4"] == pytest.approx(0.5)
    assert scored[0]["correct"] == [True, False, True, False]


def test_single_string_prediction_and_missing_field():
    metrics, _ = score_rows([{"prediction": r"\boxed{\frac{3}{4}}", "answer": r"\frac{3}{4}"}])
    assert metrics["accuracy"] == 1.0
    with pytest.raises(ValueError, match="`answer`"):
        score_rows([{"prediction": "1"}])
