"""The process world and Horovod collectives for Keras 3.

This is the only module that imports horovod. `horovod.tensorflow.keras` and
`hvd.DistributedGradientTape` do not understand Keras 3 variables, so tfllm builds on the
plain tensor collectives (`grouped_allreduce`, `broadcast`, `allgather`), which do.

Without Horovod installed, or with TFLLM_DISABLE_HOROVOD=1, every function behaves exactly
as Horovod does with one process: collectives return their input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfllm import interfaces, launcher_watch

try:  # Horovod is optional at import time so that single-process tools run anywhere.
    if os.environ.get("TFLLM_DISABLE_HOROVOD") == "1":
        raise ImportError("disabled by TFLLM_DISABLE_HOROVOD=1")
    import horovod.tensorflow as hvd
except ImportError:  # pragma: no cover - exercised by the fallback test in a subprocess
    hvd = None


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "none"  # none | gloo | mpi
    hosts: tuple[str, ...] = ()  # host name of each rank, by rank

    def placement(self) -> str:
        """'h1 (rank 0), h2 (rank 1)': how launcher messages about rank N map to hosts."""
        return ", ".join(f"{h} (rank{'s' if n > 1 else ''} {r})" for h, r, n in _ranges(self.hosts))

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return hvd is not None and self.size > 1


_world: World | None = None


def init(pin_gpu: bool = True, elastic: bool = False) -> World:
    """Initialises Horovod once and pins this process to one GPU by local rank.

    Elastic mode runs no collective here (a joining worker would deadlock against the others'
    sync): the world's host names are gathered when `elastic_run` enters the training function.
    """
    global _world
    if _world is not None:
        return _world
    if hvd is None:
        _world = World(hosts=(socket.gethostname(),))
    else:
        # A wrong interface setting fails here, on the host that lacks it, before any collective.
        interfaces.check()
        hvd.init()
        _world = _read_world(gather_hosts=not elastic)
        if hvd.size() > 1 or elastic:
            launcher_watch.start()
    if pin_gpu:
        _pin_gpu(_world.local_rank)
    _share_cpu_threads(_world.local_size)
    return _world


def _read_world(gather_hosts: bool) -> World:
    host = socket.gethostname()
    backend = "gloo" if hvd.gloo_enabled() and hvd.gloo_built() else ("mpi" if hvd.mpi_enabled() else "none")
    backend = backend if hvd.size() > 1 else "none"
    hosts = (tuple(hvd.allgather_object(host)) if hvd.size() > 1 else (host,)) if gather_hosts else ()
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), backend, hosts)


def chief_only(log):
    """`log` on whichever process is rank 0 when it is called (elastic mode may move rank 0)."""
    return lambda *a, **k: log(*a, **k) if world().is_chief else None


def _share_cpu_threads(local_size: int) -> None:
    """Splits the host's cores between the ranks on it when they compute on the CPU.

    Without this every rank sizes its thread pools to all cores, and N ranks on N cores spend
    their time preempting each other.
    """
    if local_size <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_size)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    except RuntimeError:  # the runtime already started; the caller configured threads
        pass


def _ranges(hosts):
    """(host, 'a-b' or 'a', count) for runs of consecutive ranks on one host."""
    out = []
    for rank, host in enumerate(hosts):
        if out and out[-1][0] == host and out[-1][2] == rank:
            out[-1][2] = rank + 1
        else:
            out.append([host, rank, rank + 1])
    return [(h, f"{a}" if b - a == 1 else f"{a}-{b - 1}", b - a) for h, a, b in out]


def world() -> World:
    return _world if _world is not None else init()


def _pin_gpu(local_rank: int) -> None:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    # Memory growth lets several processes (and the TensorBoard sampler) share a GPU in tests.
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by the caller; their choice stands
            return
    try:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
    except RuntimeError:
        pass


def horovod_available() -> bool:
    return hvd is not None


_local_only = False


def _collectives_active() -> bool:
    return hvd is not None and world().size > 1 and not _local_only


@contextlib.contextmanager
def local_only():
    """Collectives traced or run inside return their input, as on one process.

    Benchmarks trace a step in here to time its computation alone on every rank of a job.
    """
    global _local_only
    _local_only = True
    try:
        yield
    finally:
        _local_only = False


def grouped_allreduce_mean(tensors: Sequence[tf.Tensor], compress_fp16: bool = False) -> list[tf.Tensor]:
    """Averages a list of floating tensors over all ranks with one Horovod grouped allreduce.

    Works eagerly and inside a (non-XLA) tf.function. A Horovod group must share one dtype,
    so every tensor travels as float32, or as float16 with `compress_fp16`, and comes back
    in its own dtype. Callers keep bookkeeping values near 1 so that float16 holds them well.
    """
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    if not _collectives_active():
        return tensors
    wire_dtype = tf.float16 if compress_fp16 else tf.float32
    wire = [t if t.dtype == wire_dtype else tf.cast(t, wire_dtype) for t in tensors]
    reduced = hvd.grouped_allreduce(wire, op=hvd.Average)
    return [r if r.dtype == t.dtype else tf.cast(r, t.dtype) for r, t in zip(reduced, tensors)]


def allreduce_sum(value, name: str | None = None) -> np.ndarray:
    """Sum of a host value (scalar or array) over ranks, as float64 numpy."""
    arr = np.asarray(value, dtype=np.float64)
    if not _collectives_active():
        return arr
    return hvd.allreduce(tf.constant(arr), op=hvd.Sum, name=name).numpy()


def allreduce_max(value, name: str | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if not _collectives_active():
        return arr
    return hvd.allreduce(tf.constant(arr), op=hvd.Max, name=name).numpy()


def allgather(value) -> np.ndarray:
    """Concatenates each rank's array along axis 0."""
    arr = np.asarray(value)
    if not _collectives_active():
        return arr
    return hvd.allgather(tf.constant(arr)).numpy()


def broadcast_object(obj, root: int = 0):
    """Sends a picklable Python object from `root` to every rank."""
    if not _collectives_active():
        return obj
    return hvd.broadcast_object(obj, root_rank=root)


def allgather_object(obj) -> list:
    """Every rank's picklable object, by rank."""
    if not _collectives_active():
        return [obj]
    return list(hvd.allgather_object(obj))


def broadcast_variables(variables: Sequence, root: int = 0) -> None:
    """Overwrites every variable with root's value (Keras 3 or tf.Variable)."""
    variables = list(variables)
    if not _collectives_active() or not variables:
        return
    values = [tf.convert_to_tensor(v.value if hasattr(v, "value") and not isinstance(v, tf.Variable) else v)
              for v in variables]
    # One graph holding every broadcast lets Horovod fuse them instead of a round trip per variable.
    synced = tf.function(lambda vs: [hvd.broadcast(t, root_rank=root) for t in vs])(values)
    for v, value in zip(variables, synced):
        v.assign(value)


def barrier() -> None:
    if _collectives_active():
        hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="tfllm_barrier")


class ElasticError(RuntimeError):
    """The elastic job cannot go on (too few workers for too long, or a reset that failed)."""


def is_collective_failure(error: BaseException) -> bool:
    """A failed collective: a peer died or left, so the ring must be re-formed.

    Horovod's own `hvd.elastic.run` recognises only messages naming HorovodAllreduce,
    HorovodAllgather or HorovodBroadcast, and silently *returns* on any other UnknownError: a
    peer lost during tfllm's HorovodGroupedAllreduce would end the training function as if it
    had finished. Every op error from a Horovod op counts here.
    """
    if hvd is None:
        return False
    from horovod.common.exceptions import HorovodInternalError
    if isinstance(error, HorovodInternalError):
        return True
    return isinstance(error, tf.errors.OpError) and "horovod" in (error.message or "").lower()


def elastic_run(body, state) -> object:
    """Runs `body(commit)` under Horovod elastic until it returns, re-forming the ring as
    workers fail, leave or join.

    `state` provides commit() (host copies of the training state), restore() (back to the last
    commit), sync() (rank 0's state to every worker, joiners included), reset() (after the ring
    re-formed, before the sync) and keep() (the last commit to disk, before waiting for a new
    ring that may never form). `commit` from the body commits and raises Horovod's
    HostsUpdatedInterrupt at the same step on every rank when the launcher reported a change
    of hosts. With one process and no Horovod it simply runs the body.
    """
    if hvd is None:
        state.sync()
        return body(state.commit)
    from horovod.common.elastic import State, notification_manager
    from horovod.common.exceptions import HostsUpdatedInterrupt

    class _HorovodState(State):
        def __init__(self):
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)

        def save(self):
            state.commit()

        def restore(self):
            state.restore()

        def sync(self):
            state.sync()

        def reset(self):
            state.reset()

    global _world
    tracked = _HorovodState()
    notification_manager.init()
    notification_manager.register_listener(tracked)
    try:
        sync = True
        while True:
            try:
                if sync:
                    tracked.sync()
                _world = _read_world(gather_hosts=True)
                return body(tracked.commit)
            except HostsUpdatedInterrupt as e:
                sync = not e.skip_sync  # hosts only removed: every survivor holds the commit already
                if e.skip_sync:
                    state.keep()
            except Exception as e:
                if not is_collective_failure(e):
                    raise
                tracked.restore()
                state.keep()
                sync = True
            hvd.shutdown()
            try:
                hvd.init()
            except Exception as e:
                raise ElasticError(f"the ring could not be re-formed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            _world = _read_world(gather_hosts=False)
            tracked.on_reset()
    finally:
        notification_manager.remove_listener(tracked)


def shutdown() -> None:
    global _world
    if hvd is not None and _world is not None:
        hvd.shutdown()
    _world = None
