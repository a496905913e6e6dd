"""A pipeline's console: tfllm's own lines, not TensorFlow's C++ start-up chatter.

TensorFlow 2.21 logs through absl's C++ logging, which writes to stderr before anything can
configure it and ignores TF_CPP_MIN_LOG_LEVEL for its import-time lines: on a CPU machine every
rank printed a notice about absl::InitializeLog, oneDNN, the CPU features, missing CUDA drivers
and an `E0000 ... failed call to cuInit` that reads like a failure. So before TensorFlow loads,
the process' stderr (fd 2) becomes a pipe that a thread copies to the real stderr, leaving out:

- C++ log lines (`I0000 ...`, `W0000 ...` and the older `2026-... I tensorflow/...` form) of
  severity info and warning, and absl's "before InitializeLog" notice;
- on a machine with no NVIDIA device, error lines about CUDA, cuDNN, cuFFT and cuBLAS, since
  nothing there can use them;
- oneDNN's error-severity note that an int8 or int64 kernel falls back to Eigen (int8 matmuls of
  quantized models, int64 ops in TensorFlow's own code; a bf16 or fp16 fallback, a speed hint,
  stays);
- TensorFlow's Python info lines (`INFO:tensorflow:Assets written to ...` when a SavedModel is
  saved): absl's Python logging, which the pipelines run under, shows info by default.

Errors, fatal messages, tracebacks, Python warnings and everything tfllm prints pass through.
`--tf_logs` on the command line or TFLLM_TF_LOGS=1 leaves stderr untouched. A C++ fatal error
that aborts the process at once may lose its last line to the pipe: rerun with --tf_logs.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import select
import sys
import threading
import time

ENV = "TFLLM_TF_LOGS"
_CPP_LINE = re.compile(rb"^(?:([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]*\]"
                       rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) [^\]]*\])")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# The second line of the CPU-feature notice, which has no log prefix of its own.
_CONTINUATION = re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow with the appropriate "
                           rb"compiler flags\.$")
_CUDA = re.compile(rb"cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS|GPU will not be used")
# Logged at error severity but only a note that a fallback kernel runs (int8 matmuls of a
# quantized model on any CPU, since the check is made even where AVX-512 is present; int64 ops).
_FALLBACK_NOTICE = re.compile(rb"oneDNN supports DT_(INT8|INT64) only on platforms with AVX-512\. Falling back")
_PY_INFO = b"INFO:tensorflow:"
# Written by restore() after this process' last line: the copier stops there instead of waiting
# for the pipe's end, which never comes while a child holds it (Open MPI's singleton orted, forked
# by a one-process Horovod run, keeps our stderr until after we exit: 5 s of every exit).
_END = b"\0tfllm-console-end\0"
_state: dict = {}


def has_nvidia_device() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/nvidiactl")


def keep(line: bytes, gpu: bool) -> bool:
    """Whether a line written to stderr reaches the console."""
    bare = line.rstrip(b"\r\n")
    if bare == _ABSL_NOTICE or _CONTINUATION.match(bare) or bare.startswith(_PY_INFO):
        return False
    match = _CPP_LINE.match(line)
    if not match:
        return True
    severity = match.group(1) or match.group(2)
    if severity in (b"I", b"W") or _FALLBACK_NOTICE.search(line):
        return False
    return gpu or severity == b"F" or not _CUDA.search(line)


def _copy(read_fd: int, real_fd: int, gpu: bool) -> None:
    pending = b""
    while True:
        try:
            data = os.read(read_fd, 1 << 16)
        except OSError:
            data = b""
        buffered = pending + data
        # Only the tail of `pending` can start a marker: a long line without a newline (a progress
        # bar's \r updates) is not searched again on every read.
        end = buffered.find(_END, max(0, len(pending) - len(_END) + 1))
        if end >= 0 or not data:
            pending = buffered[:end] if end >= 0 else buffered
            break
        lines = buffered.split(b"\n")
        pending = lines.pop()
        _write_kept(real_fd, lines, gpu)
    lines = pending.split(b"\n")
    last = lines.pop()
    _write_kept(real_fd, lines, gpu)
    if last and keep(last, gpu):
        os.write(real_fd, last)
    os.close(read_fd)  # what children write after the marker (orted's teardown) now fails with EPIPE


def _write_kept(real_fd: int, lines: list[bytes], gpu: bool) -> None:
    out = b"".join(line + b"\n" for line in lines if keep(line + b"\n", gpu))
    if out:
        os.write(real_fd, out)


def quiet_tensorflow(argv: list[str] | None = None) -> None:
    """Filters fd 2 from now on (call before TensorFlow loads); idempotent."""
    argv = sys.argv if argv is None else argv
    # Read here, before absl parses flags (TensorFlow loads first), and taken out of argv for it.
    for arg in [a for a in argv if a in ("--tf_logs", "--tf_logs=true", "--tf_logs=1")]:
        argv.remove(arg)
        os.environ[ENV] = "1"  # child processes see the choice too
    if os.environ.get(ENV) == "1" or _state:
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    thread = threading.Thread(target=_copy, args=(read_fd, real, has_nvidia_device()), daemon=True,
                              name="tfllm-console")
    thread.start()
    _state.update(real=real, thread=thread, writer=write_fd, pid=os.getpid())
    atexit.register(restore)


def restore() -> None:
    """Puts the real stderr back and lets the copier write out what it still holds."""
    if not _state or _state["pid"] != os.getpid():  # a forked child's exit must not end its parent's copier
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(_state["real"], 2)
    copier, writer = _state["thread"], _state["writer"]
    deadline = time.monotonic() + 5
    # The marker goes after everything this process wrote; the write end stays blocking (children
    # share its file description), so wait for room instead, and not for a copier that died.
    while copier.is_alive() and time.monotonic() < deadline:
        if select.select([], [writer], [], 0.1)[1]:
            os.write(writer, _END)  # shorter than PIPE_BUF: one atomic write
            break
    os.close(writer)
    copier.join(timeout=max(0.0, deadline - time.monotonic()))
    if not copier.is_alive():  # a copier still running may yet write to it
        os.close(_state["real"])
    _state.clear()


def main() -> None:
    """`horovodrun ... 2> >(python -m tfllm.console >&2)`: the same filter over a launcher's own
    stderr. horovodrun imports TensorFlow in a subprocess to check its build before it starts any
    rank, and those notices reach its stderr unfiltered; the ranks' lines are filtered already."""
    gpu, everything = has_nvidia_device(), os.environ.get(ENV) == "1"
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if everything or keep(line, gpu):
            out.write(line)
            out.flush()


if __name__ == "__main__":
    main()
