"""studies.common's step timing, shared by the two cost scripts: every method trained once per round, interleaved, and
each round's first step (warm-up) left out of the medians."""

from __future__ import annotations

import time

from studies.common import time_steps_interleaved


class FakeTrainer:
    """Calls its callbacks around `steps` steps per `train()`; the first step of each call is slow (warm-up)."""

    def __init__(self, name: str, step_s: float, order: list, steps: int = 3):
        self.name, self.step_s, self.order, self.steps, self.callbacks = name, step_s, order, steps, []

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def train(self):
        self.order.append(self.name)
        for i in range(self.steps):
            for c in self.callbacks:
                c.on_step_begin()
            time.sleep(self.step_s * (20 if i == 0 else 1))
            for c in self.callbacks:
                c.on_step_end()


def test_steps_are_timed_interleaved_without_each_rounds_first_step():
    order = []
    trainers = {"sft": FakeTrainer("sft", 0.002, order), "asft": FakeTrainer("asft", 0.01, order)}
    methods, loads = time_steps_interleaved(trainers, rounds=2)
    assert order == ["sft", "asft", "sft", "asft"]  # interleaved, so a change of load hits both
    assert len(loads) == 2
    assert methods["sft"]["steps_timed"] == methods["asft"]["steps_timed"] == 4  # 2 rounds x (3 steps - warm-up)
    # The warm-up steps (20 x longer) are gone: the medians are near the plain step times
    assert 0.002 <= methods["sft"]["wall_s_per_step"] < 0.02
    assert 0.01 <= methods["asft"]["wall_s_per_step"] < 0.1
    assert methods["asft"]["wall_s_per_step"] > methods["sft"]["wall_s_per_step"]
