"""Stops a rank whose launcher is gone, the way SIGTERM stops it: at a step every rank agrees on.

horovodrun reaches the ranks on other hosts through ssh. Terminated (Ctrl-C, SIGTERM, a deleted
launcher pod), horovodrun 0.28.1 kills its local ssh clients and exits 1; nothing is sent to
the remote ranks, which are healthy and connected to each other, so they trained on with no
one watching and no end. Measured on the emulated cluster: both ranks still training after the
launcher had exited. mpirun forwards SIGTERM itself, but a rank whose orted dies is in the same
position.

What every such rank does see is its stdout and stderr losing their reader: sshd (or orted)
closes the session's pipes as soon as the launcher's side is gone, and poll() reports POLLERR
or POLLHUP on them. The watch then points both streams at /dev/null, so that the rank's last
messages cannot fail, and sends the process SIGTERM. The training loop's handler does the rest:
the stop rides in the step's allreduce, every rank stops at the same step, and rank 0 saves a
checkpoint that the next run resumes from.

The watch is a thread, and a busy rank's main thread may print before that thread runs: rank 0
printed a step's line into the closed pipe and died of the BrokenPipeError, with no checkpoint
(seen once on the emulated cluster with both cores busy). So sys.stdout and sys.stderr are
wrapped too, and a write that finds the reader gone stops the rank the same way, once.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
import threading

_started = False
_stopping = threading.Lock()


def _watched_fds() -> list[int]:
    """stdout/stderr when they are pipes or sockets (a terminal or a file has no reader to lose)."""
    fds = []
    for fd in (1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            fds.append(fd)
    return fds


def _silence_and_stop() -> None:
    # Once: a second SIGTERM could arrive after training restored the default handler.
    if not _stopping.acquire(blocking=False):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.kill(os.getpid(), signal.SIGTERM)


class _StopOnLostReader:
    """A text stream whose write into a lost reader stops the rank (see the module's docstring)
    instead of raising in whatever code was printing."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _silence_and_stop()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            _silence_and_stop()
            try:
                self._stream.flush()  # what was buffered goes to /dev/null now
            except BrokenPipeError:
                pass  # the watch thread holds the stop and has not pointed the streams at /dev/null yet

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _watch(poller: "select.poll") -> None:
    while True:
        # With no events asked for, poll() still reports POLLERR/POLLHUP: a lost reader.
        if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poller.poll(1000)):
            _silence_and_stop()
            return


def start() -> bool:
    """Starts the watch once per process; False when stdout and stderr are not pipes or sockets."""
    global _started
    if _started:
        return True
    fds = _watched_fds()
    if not fds:
        return False
    poller = select.poll()
    for fd in fds:
        poller.register(fd, 0)
    threading.Thread(target=_watch, args=(poller,), name="tfllm-launcher-watch", daemon=True).start()
    sys.stdout, sys.stderr = _StopOnLostReader(sys.stdout), _StopOnLostReader(sys.stderr)
    _started = True
    return True
