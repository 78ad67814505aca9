"""Diagnostics for ASFT runs: training-curve plots (`plot`) and the held-out drift measure (`drift`).

They only read runs and measure models; nothing here changes training.
"""

from .drift import GENERAL_PROMPTS, DriftCallback, DriftProbe, add_drift_callback
from .plot import load_run, plot_run_dirs, plot_runs

__all__ = [
    "GENERAL_PROMPTS",
    "DriftCallback",
    "DriftProbe",
    "add_drift_callback",
    "load_run",
    "plot_run_dirs",
    "plot_runs",
]
