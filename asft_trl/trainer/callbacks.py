"""The callbacks `ASFTTrainer` installs that hold state of their own, as TRL keeps its in `trl/trainer/callbacks.py`.

`AdaptiveKLCallback` holds the adaptive KL controller (`kl_target`). TRL's `SyncRefModelCallback` (TR-DPO) is used as
it is; the pre-flight check (`asft_trl.diagnostics.preflight.PreflightCheck`) is a diagnostic and lives with the
others. Nothing here computes a loss.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .kl_control import AdaptiveKLController

logger = logging.getLogger(__name__)


class AdaptiveKLCallback(TrainerCallback, ExportableState):
    """Holds the adaptive KL controller of `ASFTTrainer`: updates lambda once per optimizer step from the mean KL of
    all the step's micro-batches, and carries its state through checkpoints.

    As an `ExportableState` callback, its state is written into every checkpoint's `trainer_state.json`
    (`stateful_callbacks`). On resume it restores that state itself in `on_train_begin`, so no flag is needed; with
    `restore_callback_states_from_checkpoint=True` transformers rebuilds it from the same state, to the same effect.
    The controller's settings are the current run's; only lambda (and the counters) come from the checkpoint.
    """

    def __init__(
        self, kl_coef: float, target: float, horizon: float, error_clip: float, controller_state: dict | None = None
    ):
        self.controller = AdaptiveKLController(kl_coef, target, horizon, error_clip)
        if controller_state is not None:
            self.controller.load_state_dict(controller_state)
        self._kl_sum = 0.0
        self._count = 0.0

    def add_kl(self, kl_sum: float, count: float) -> None:
        self._kl_sum += kl_sum
        self._count += count

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before the step's logging and checkpoint, so a checkpoint holds lambda for the next step
        if self._count > 0:
            self.controller.update(self._kl_sum / self._count)
        self._kl_sum = self._count = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)
        if isinstance(saved, dict) and "controller_state" in saved.get("args", {}):
            self.controller.load_state_dict(saved["args"]["controller_state"])
        elif state.global_step > 0:
            logger.warning(
                f"The checkpoint resumed from has no adaptive KL controller state: lambda starts again from "
                f"kl_coef={self.controller.kl_coef} at step {state.global_step}."
            )
        # The settings are this run's (a resume may change the target); lambda is the checkpoint's
        self.controller.target, self.controller.horizon = args.kl_target, args.kl_horizon
        self.controller.error_clip = args.kl_error_clip
        self._kl_sum = self._count = 0.0
        # A checkpoint written by a run without the controller has no entry, and transformers' save expects one
        state.stateful_callbacks[name] = self.state()

    def state(self) -> dict:
        controller = self.controller
        return {
            "args": {
                "kl_coef": controller.kl_coef,
                "target": controller.target,
                "horizon": controller.horizon,
                "error_clip": controller.error_clip,
                "controller_state": controller.state_dict(),
            },
            "attributes": {},
        }
