r"""Elastic pretraining: workers may fail, leave and join while the job goes on (Horovod elastic, Gloo).

    horovodrun -np 3 --min-np 2 --max-np 4 --host-discovery-script ./discover_hosts.sh \\
        --slots-per-host 1 python -m pipelines.pretrain --flagfile=... --elastic --elastic_commit_every=10

The state is the training loop's own (`tfllm.loop`): the model's and optimizer's variables
(weights, moments, iteration count, loss scale, the seed generators' RNG) and `LoopState` (step,
data position, tokens seen, scores). Horovod's `TensorFlowKerasState` cannot hold it on Keras 3
(it calls `optimizer.variables()`, a property there) and `TensorFlowState` never sends joiners
the weights (it broadcasts only in its constructor, and only in graph sessions), so this module
keeps its own:
- commit, every --elastic_commit_every steps: host (numpy) copies of every variable and a copy
  of LoopState; the commit also checks, on every rank at the same step, whether the launcher
  reported hosts added or removed;
- restore, after a collective failed: the variables and LoopState of the last commit, so at
  most --elastic_commit_every steps are redone;
- keep, before waiting for a new ring that may never form: the last commit as a checkpoint
  (one writer per checkpoint dir, by a lock), so a job that ends because too few workers remain
  leaves its last committed step on disk;
- sync, on entry and after every reset that added workers: rank 0's variables and LoopState
  to every worker, the joiners included;
- reset, when the ring has re-formed: the step is traced again for the new world (its
  collectives, its world size), the learning rate follows the world size when
  --scale_lr_with_world_size says so, and --elastic_global_batch picks the accumulation.

Data order: the data position is a global sample count and the epoch's order is a permutation of
all windows (`tfllm.data.sampler`), so after a resize the rest of the epoch is shared among the
new ranks with no repeats and no gaps (rolled-back steps are simply taken again).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import time

import numpy as np

from tfllm import distributed
from tfllm.loop import TrainingError, TrainLoop


def weights_digest(variables) -> str:
    digest = hashlib.sha256()
    for v in variables:
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


def accumulation_for(global_batch: int, world_size: int, batch_size: int) -> int | None:
    """Micro-batches per step that keep `global_batch` windows at this world size, or None."""
    per_step = world_size * batch_size
    return global_batch // per_step if global_batch % per_step == 0 else None


class ElasticState:
    def __init__(self, loop: TrainLoop, step_fn, tcfg, log, end: int):
        self.loop, self.step_fn, self.tcfg, self.log = loop, step_fn, tcfg, log
        self.say = distributed.chief_only(log)
        self.committed = None
        # Synced from rank 0 with the state: the resets so far, and where this invocation started
        # and ends (--stop_after counts from rank 0's restored step, which joiners never saw).
        self.generation, self.start, self.end = 0, loop.state.step, end
        self.world_size = None
        self.lost_at = None  # when the last failure or removal was seen
        self.resumed_from = None  # step training resumed from after the last reset
        self.rolled_back = None  # what the last restore undid, until the new world's rank 0 says it

    # -- Horovod's hooks
    def commit(self) -> None:
        variables = self.loop.variables
        self.committed = ([v.numpy() for v in variables], copy.deepcopy(self.loop.state))

    def restore(self) -> None:
        if self.committed is None:  # lost during the first sync: the next sync sets everything
            return
        values, state = self.committed
        lost = self.loop.state.step - state.step
        for v, value in zip(self.loop.variables, values):
            v.assign(value)
        self.loop.state = copy.deepcopy(state)
        # Said after the ring re-forms, by the new rank 0: the old one may be the worker that died.
        self.rolled_back = f"a collective failed; rolled back to the commit at step {state.step} " \
                           f"({lost} step{'s' if lost != 1 else ''} to redo)"

    def sync(self) -> None:
        distributed.broadcast_variables(self.loop.variables)
        self.loop.state, self.generation, self.start, self.end = distributed.broadcast_object(
            (self.loop.state, self.generation, self.start, self.end))
        self.loop.start_step = self.start
        self._adapt()
        self.commit()

    def reset(self) -> None:
        if self.rolled_back:
            self.say(f"elastic: {self.rolled_back}")
            self.rolled_back = None
        self.generation += 1
        self.lost_at = self.lost_at or time.monotonic()
        self._adapt()

    def keep(self) -> None:
        """The last commit to disk, once per step whoever gets there first.

        `elastic_run` calls it right after a restore or at a commit, so the live state is the
        commit and is saved as it is.
        """
        self.lost_at = time.monotonic()
        if self.committed is None:
            return
        step = self.loop.state.step
        checkpoints = self.loop.checkpoints
        os.makedirs(checkpoints.dir, exist_ok=True)
        with open(os.path.join(checkpoints.dir, ".elastic.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            latest = checkpoints.latest()
            if latest and int(checkpoints.read_state(latest).get("step", -1)) >= step:
                return
            path = self.loop.save(any_rank=True)
        self.log(f"elastic: the commit of step {step} saved to {path}; waiting up to horovodrun's "
                 "--elastic-timeout for enough workers to re-form the ring")

    # -- helpers
    def _adapt(self) -> None:
        """Fits the step to the world of this generation."""
        world = distributed.world()
        batches = self.loop.task.source
        batches.generation = self.generation
        accumulation = None
        if self.tcfg.elastic_global_batch:
            accumulation = accumulation_for(self.tcfg.elastic_global_batch, world.size, self.tcfg.batch_size)
            if accumulation is None:
                accumulation = batches.micro_batches
                self.say(f"warning: --elastic_global_batch={self.tcfg.elastic_global_batch} is not a multiple of "
                         f"{world.size} ranks x --batch_size={self.tcfg.batch_size}; keeping {accumulation} "
                         f"micro-batches ({world.size * self.tcfg.batch_size * accumulation} windows per step)")
            batches.micro_batches = accumulation
        self.step_fn.retrace(accumulation)
        self.loop.checkpoint_meta.update(grad_accum_steps=batches.micro_batches,
                                         global_batch=world.size * self.tcfg.batch_size * batches.micro_batches)
        schedule = getattr(self.loop.optimizer, "inner_optimizer", self.loop.optimizer)._learning_rate
        if hasattr(schedule, "world_size"):
            schedule.world_size.assign(float(world.size))
        if self.world_size is not None and self.world_size != world.size:
            self.say(f"elastic: world {self.world_size} -> {world.size} ranks; "
                     f"{world.size * self.tcfg.batch_size * batches.micro_batches} windows per step from step "
                     f"{self.loop.state.step}")
        self.world_size = world.size
        self.resumed_from = self.loop.state.step

    def after_step(self, loop: TrainLoop, commit) -> None:
        if self.lost_at is not None and loop.state.step == self.resumed_from + 1:
            self.say(f"elastic: training resumed at step {loop.state.step} on {distributed.world().size} ranks, "
                     f"{time.monotonic() - self.lost_at:.1f} s after the change was seen")
            self.lost_at = None
        if loop.state.step % self.tcfg.elastic_commit_every == 0:
            commit()


def train_elastic(loop: TrainLoop, end: int, tcfg, log=print) -> dict:
    """Runs the loop to `end` under Horovod elastic, then the task's finish (on the final world)."""
    state = ElasticState(loop, loop.task.step_fn, tcfg, log, end)
    loop.stop_on_signal = False  # a signalled worker leaves; the others go on without it

    def body(commit):
        world = distributed.world()
        loop.say(f"elastic: generation {state.generation}: {world.size} rank(s) at step {loop.state.step}"
                 + (f" ({world.placement()})" if world.hosts else ""))
        loop.run(state.end, after_step=lambda l: state.after_step(l, commit))
        result = loop.task.finish(loop)
        # Every rank must hold the same weights after resets and syncs: checked, not assumed.
        digests = distributed.allgather_object(weights_digest(loop.model.variables))
        if len(set(digests)) > 1:
            raise TrainingError(f"elastic: the {len(digests)} ranks ended with different weights "
                                f"(sha256 {', '.join(d[:12] for d in digests)})")
        loop.say(f"elastic: final weights identical on {len(digests)} rank(s) (sha256 {digests[0][:16]})")
        return {**result, "weights_sha256": digests[0]}

    return distributed.elastic_run(body, state)
