"""What lambda (`kl_coef`) is at each optimizer step: the schedules, and the adaptive controller that holds the KL near
a target.

Pure Python: functions of the step and a small controller object with a state it can export and load. No trainer,
no tensors; the trainer (`asft_trl.trainer.trainer`) decides when to read and update them.

Steps are counted as the Trainer counts them: `step` is the number of optimizer steps already taken (the Trainer's
`global_step` while it computes the next one), so the first optimizer step has `step == 0`, as in transformers'
learning-rate schedules. The step logged as `step: s` used lambda(s - 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KL_COEF_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "by_step")


def warmup_step_count(warmup_steps: float, total_steps: int) -> int:
    """`warmup_steps` >= 1 is a number of steps; a value in (0, 1) is a ratio of `total_steps` (as transformers'
    `warmup_steps`), rounded up."""
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(total_steps * warmup_steps)


def constant(step: int, kl_coef: float) -> float:
    """The paper's lambda: the same at every step."""
    return kl_coef


def constant_with_warmup(step: int, kl_coef: float, warmup: int) -> float:
    """Linear from 0 (at step 0) to `kl_coef` (at step `warmup`), then constant."""
    if step < warmup:
        return kl_coef * step / warmup
    return kl_coef


def cosine(step: int, total_steps: int, kl_coef: float, final: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 over `warmup` steps (if any), then half a cosine from `kl_coef` to `final` at
    `total_steps`. `final` may be above `kl_coef` (a rising anchor)."""
    if step < warmup:
        return kl_coef * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final + (kl_coef - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def by_step(step: int, kl_coef: float, milestones: Mapping[int, float]) -> float:
    """Piecewise constant: `kl_coef` until the first milestone; `{s: v}` makes lambda `v` once `s` optimizer steps
    have been taken (from the step logged as `s + 1` on)."""
    value = kl_coef
    for milestone in sorted(milestones):
        if step < milestone:
            break
        value = milestones[milestone]
    return value


@dataclass(frozen=True)
class KLCoefSchedule:
    """A schedule of lambda by optimizer step, as configured by `ASFTConfig.kl_coef_schedule` and its fields."""

    name: str
    kl_coef: float
    warmup_steps: float = 0
    final: float = 0.0
    milestones: Mapping[int, float] = field(default_factory=dict)

    def __call__(self, step: int, total_steps: int) -> float:
        if self.name == "constant":
            return constant(step, self.kl_coef)
        if self.name == "constant_with_warmup":
            return constant_with_warmup(step, self.kl_coef, warmup_step_count(self.warmup_steps, total_steps))
        if self.name == "cosine":
            return cosine(
                step, total_steps, self.kl_coef, self.final, warmup_step_count(self.warmup_steps, total_steps)
            )
        if self.name == "by_step":
            return by_step(step, self.kl_coef, self.milestones)
        raise ValueError(f"Unknown kl_coef_schedule {self.name!r}; use one of {', '.join(KL_COEF_SCHEDULES)}.")


def adaptive_update(
    kl_coef: float, kl: float, target: float, horizon: float, error_clip: float, n_steps: int = 1
) -> float:
    """One step of the proportional controller of Ziegler et al. (2019), as in the old TRL `AdaptiveKLController`:

        lambda <- lambda * (1 + clip(kl / target - 1, -error_clip, error_clip) * n_steps / horizon)

    `horizon` is in optimizer steps here (one update per optimizer step, `n_steps=1`): a KL persistently off target by
    the clipped amount moves lambda by a factor of about exp(error_clip) every `horizon` steps.
    """
    error = min(max(kl / target - 1.0, -error_clip), error_clip)
    return kl_coef * (1.0 + error * n_steps / horizon)


@dataclass
class AdaptiveKLController:
    """Holds lambda and moves it once per optimizer step so that the measured KL stays near `target`.

    Its state (`state_dict`) is what a resumed run needs to continue identically: the current lambda, plus the number
    of updates and the last KL seen (for the logs).
    """

    kl_coef: float
    target: float
    horizon: float
    error_clip: float
    num_updates: int = 0
    last_kl: float | None = None

    def update(self, kl: float, n_steps: int = 1) -> float:
        self.kl_coef = adaptive_update(self.kl_coef, kl, self.target, self.horizon, self.error_clip, n_steps)
        self.num_updates += n_steps
        self.last_kl = kl
        return self.kl_coef

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef, "num_updates": self.num_updates, "last_kl": self.last_kl}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kl_coef = float(state["kl_coef"])
        self.num_updates = int(state.get("num_updates", 0))
        self.last_kl = state.get("last_kl")


def parse_milestones(value: Any) -> dict[int, float]:
    """`kl_coef_milestones` as given (a mapping from YAML or Python, or a JSON object string from the command line)
    -> {step: lambda} with int steps >= 0 and finite lambdas >= 0. Raises ValueError naming the field and the fix."""
    import json

    example = 'e.g. {"100": 0.02, "500": 0.0} on the command line, or a mapping 100: 0.02 in YAML'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"kl_coef_milestones={value!r} is not a JSON object ({error}). Give {example}."
            ) from error
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"kl_coef_milestones={value!r} must be a non-empty mapping of step to lambda: {example}.")
    milestones = {}
    for step, coef in value.items():
        try:
            step_int = int(step)
            coef_float = float(coef)
        except (TypeError, ValueError):
            raise ValueError(
                f"kl_coef_milestones entry {step!r}: {coef!r} is not (whole step number): (number). Give {example}."
            ) from None
        if str(step).strip() != str(step_int) or step_int < 0:
            raise ValueError(f"kl_coef_milestones step {step!r} must be a whole number of optimizer steps >= 0.")
        if not math.isfinite(coef_float) or coef_float < 0:
            raise ValueError(f"kl_coef_milestones lambda {coef!r} at step {step_int} must be a finite number >= 0.")
        milestones[step_int] = coef_float
    return dict(sorted(milestones.items()))
