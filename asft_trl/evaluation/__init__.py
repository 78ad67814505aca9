"""Scoring models the way the ASFT paper did: math (avg@n with math-verify), medical (next-token letter
log-probabilities), code (pass@1 by running the tests in a sandboxed subprocess), plus exact match for the
quickstart task. `asft-trl eval` (asft_trl/scripts/evaluate.py) is the entry point; each suite's scorer also works on
its own:

    from asft_trl.evaluation.math import score_rows
    metrics, rows = score_rows([{"prediction": "... \\boxed{1/2}", "answer": "\\frac{1}{2}"}])
"""
