"""A TF profiler trace of chosen training steps, for TensorBoard's Profile tab (xprof).

The trace covers host and device activity from the start of step A to the end of step B on one
rank (rank 0 unless --profile_rank says otherwise) and is written to
<model_dir>/tb/profile-rank<R>/plugins/profile/<time>/, where TensorBoard lists it as the run
`profile-rank<R>`. Steps are synchronous here (their metrics are read on the host), so the
trace holds exactly those steps.
"""

from __future__ import annotations

import os

import tensorflow as tf


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, model_dir: str, rank: int, profiled_rank: int, say):
        self.first, self.last = steps or (0, -1)
        self.enabled = steps is not None and rank == profiled_rank
        self.log_dir = os.path.join(model_dir, "tb", f"profile-rank{profiled_rank}")
        self.say, self.active = say, False

    def before(self, step: int) -> None:
        """`step` (1-based) is about to run."""
        if self.enabled and not self.active and self.first <= step <= self.last:
            options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0,
                                                              device_tracer_level=1)
            tf.profiler.experimental.start(self.log_dir, options=options)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.last:
            self.close()
            self.say(f"profile of steps {self.first}-{self.last}: {self.log_dir} (TensorBoard's Profile tab)")

    def close(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
