"""The training loop that pretraining, fine-tuning and elastic mode share.

Its state is explicit and has two parts:
- variables: the model's (weights, and the Keras seed generators that drive dropout, i.e. the
  RNG) and the optimizer's (moments, iteration count, and the loss scale under float16);
- `LoopState`: the step, the data position, tokens seen and the task's scores.
A step changes nothing else, so a checkpoint, an elastic commit and a sync from rank 0 are each
one operation over these two parts.

What differs between pretraining and fine-tuning lives in a `Task`: where a step's batches come
from, which `TrainStep` runs it, what happens between steps (validation, samples, checkpoints,
early stopping) and at the end. Console lines, TensorBoard scalars, metrics.jsonl and throughput
belong to `MetricsLog`. Rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import keras
import tensorflow as tf

from tfllm import distributed
from tfllm.checkpoint import CheckpointManager
from tfllm.summary import SummaryWriter

WARMUP_STEPS = 10  # steps that compile the step function; left out of the run's throughput


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message names the step."""


class StopRequested(Exception):
    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"stopped by signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclasses.dataclass
class LoopState:
    step: int = 0
    # Samples (windows or examples) that all ranks together consumed, in the data's global order:
    # the data position that survives a change of world size.
    samples: int = 0
    epoch: int = 0
    tokens_seen: float = 0.0
    scores: dict = dataclasses.field(default_factory=dict)  # the task's: val_loss, best_accuracy, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, stored: dict, default_samples_per_step: int) -> "LoopState":
        """From a checkpoint's state.json; older or non-elastic ones lack `samples`."""
        step = int(stored.get("step", 0))
        samples = stored.get("samples")
        if samples is None:
            samples = step * stored.get("global_batch", default_samples_per_step)
        scores = dict(stored.get("scores", {}))
        for key in ("val_loss", "best_accuracy", "evals_without_gain"):  # checkpoints before LoopState
            if key in stored and key not in scores:
                scores[key] = stored[key]
        return cls(step, int(samples), int(stored.get("epoch", 0)), float(stored.get("tokens_seen", 0.0)), scores)


class Task:
    """What a kind of training adds to the loop. Methods run on every rank unless they say so."""

    def batches(self, state: LoopState):
        """This rank's input for the next step; advances state.samples (and state.epoch)."""
        raise NotImplementedError

    def train_step(self, step: int):
        raise NotImplementedError

    def scalars(self, loop: "TrainLoop", metrics: dict) -> dict:
        return {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "learning_rate": current_lr(loop.optimizer),
                "grad_norm": metrics["grad_norm"]}

    def log_line(self, step: int, metrics: dict, scalars: dict, perf: dict) -> str:
        raise NotImplementedError

    def between_steps(self, loop: "TrainLoop", metrics: dict) -> bool:
        """Validation, samples, checkpoints after a step; True ends training early."""
        return False

    def finish(self, loop: "TrainLoop") -> dict:
        raise NotImplementedError


class MetricsLog:
    """Console line, TensorBoard scalars and metrics.jsonl every `log_every` steps, with the
    throughput of the steps since the last line (validation, samples and checkpoints excluded)."""

    def __init__(self, model_dir: str, log_every: int, say, flops_per_token: float = 0.0,
                 peak_flops: float | None = None):
        self.log_every, self.say = log_every, say
        self.writer = SummaryWriter(os.path.join(model_dir, "tb"))
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.window_tokens = self.window_time = 0.0
        self.window_steps = 0
        self.run_tokens = self.run_time = 0.0
        self.tokens_per_sec = 0.0

    def step(self, metrics: dict, seconds: float, counted: bool) -> None:
        self.window_time += seconds
        self.window_tokens += metrics.get("tokens", 0.0)
        self.window_steps += 1
        if counted:
            self.run_tokens += metrics.get("tokens", 0.0)
            self.run_time += seconds

    def due(self, step: int, end: int) -> bool:
        return step % self.log_every == 0 or step == end

    def write(self, task: Task, step: int, metrics: dict, scalars: dict, world_size: int) -> None:
        self.tokens_per_sec = self.window_tokens / max(self.window_time, 1e-9)
        perf = {}
        if self.flops_per_token:
            achieved = self.tokens_per_sec * self.flops_per_token
            perf = {"tokens_per_sec": self.tokens_per_sec, "step_time_ms": 1000 * self.window_time / self.window_steps,
                    "model_flops_per_sec": achieved}
            if self.peak_flops:
                perf["mfu"] = achieved / (self.peak_flops * world_size)
        self.writer.scalars("train", step, {**scalars, **{f"perf/{k}": v for k, v in perf.items()}})
        if distributed.world().is_chief:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars, **perf}) + "\n")
        self.say(task.log_line(step, metrics, scalars, perf))
        self.window_tokens = self.window_time = 0.0
        self.window_steps = 0

    def run_rate(self) -> float:
        return self.run_tokens / self.run_time if self.run_time else self.tokens_per_sec

    def close(self) -> None:
        self.writer.close()


def current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(inner.learning_rate)


class TrainLoop:
    """One training run's state and the steps that change it."""

    def __init__(self, task: Task, model: keras.Model, optimizer, checkpoints: CheckpointManager, log: MetricsLog,
                 checkpoint_meta: dict, say=print):
        self.task, self.model, self.optimizer = task, model, optimizer
        self.checkpoints, self.log, self.say = checkpoints, log, say
        self.checkpoint_meta = checkpoint_meta  # batch shape facts recorded with every checkpoint
        self.state = LoopState()
        self.start_step = 0
        self.losses: list[float] = []
        self.stop_on_signal = True  # elastic mode lets a signalled worker leave instead
        self.profiler = None  # a tfllm.profiler.StepProfiler, when steps are to be traced

    @property
    def variables(self) -> list:
        return list(self.model.variables) + list(self.optimizer.variables)

    def restore(self, path: str, samples_per_step: int) -> dict:
        """Loads a checkpoint into the variables and the state; returns its state.json."""
        stored = self.checkpoints.restore(path, self.variables)
        self.state = LoopState.from_checkpoint(stored, samples_per_step)
        self.start_step = self.state.step
        return stored

    def save(self, val_loss: float | None = None, any_rank: bool = False) -> str | None:
        """Rank 0 (or, with any_rank, this process) writes a checkpoint of the current state."""
        if not (any_rank or distributed.world().is_chief):
            return None
        step = self.state.step
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.trainable_variables):
            raise TrainingError(f"non-finite weights after step {step}; not saved, the last good checkpoint is "
                                f"{self.checkpoints.latest() or 'none'}")
        meta = {**self.state.to_dict(), **self.state.scores, "world_size": distributed.world().size,
                **self.checkpoint_meta}
        return self.checkpoints.save(step, self.variables, meta, val_loss)

    def step(self, stop_requested: bool = False) -> dict:
        if self.profiler is not None:
            self.profiler.before(self.state.step + 1)
        started = time.perf_counter()
        batches = self.task.batches(self.state)
        metrics = {k: float(v) for k, v in self.task.train_step(self.state.step)(batches, stop_requested).items()}
        self.state.step += 1
        if self.profiler is not None:
            self.profiler.after(self.state.step)
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(f"non-finite loss ({metrics['loss']}) at step {self.state.step}; "
                                f"the last good checkpoint is {self.checkpoints.latest() or 'none'}")
        self.state.tokens_seen += metrics.get("tokens", 0.0)
        self.log.step(metrics, time.perf_counter() - started, self.state.step - self.start_step > WARMUP_STEPS)
        self.losses.append(metrics.get("hard_loss", metrics["loss"]))  # distilling: the next-token loss
        return metrics

    def run(self, end: int, after_step=None) -> bool:
        """Steps until `end`, or until the task ends training early (then True).

        `after_step(loop)` runs after each step's hooks (elastic mode commits there). SIGTERM and
        SIGINT ride in the next step's allreduce, so every rank stops after the same step; rank 0
        saves it and StopRequested is raised.
        """
        signalled = []
        previous = {}
        if self.stop_on_signal:
            previous = {s: signal.signal(s, lambda signum, frame: signalled.append(signum))
                        for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.state.step < end:
                metrics = self.step(stop_requested=bool(signalled))
                step = self.state.step
                if self.log.due(step, end):
                    self.log.write(self.task, step, metrics, self.task.scalars(self, metrics), distributed.world().size)
                if metrics.get("stop", 0) > 0:  # after logging: the step ran, so its metrics are kept
                    raise StopRequested(step, self.save())
                if self.task.between_steps(self, metrics):
                    return True
                if after_step is not None:
                    after_step(self)
            return False
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
