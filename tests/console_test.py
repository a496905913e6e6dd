import re

import pytest

from conftest import run
from tfllm import console

CPP_NOISE = re.compile(r"^[IWE]0000 |absl::InitializeLog|cuda|CUDA", re.M)

LINES = {
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n": (False, False),
    b"I0000 00:00:1795474702.914807   16699 port.cc:153] oneDNN custom operations are on.\n": (False, False),
    b"W0000 00:00:1795474702.9   16699 gpu_device.cc:2] Cannot dlopen some GPU libraries.\n": (False, False),
    b"E0000 00:00:1795474708.522457   16699 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n":
        (False, True),
    b"2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda\n":
        (False, False),
    b"E0000 00:00:1795474708.5   16699 op_kernel.cc:1] OP_REQUIRES failed: INVALID_ARGUMENT: bad shape\n": (True, True),
    b"F0000 00:00:1795474708.5   16699 cuda_driver.cc:1] Check failed: CUDA context\n": (True, True),
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    b"compiler flags.\n": (False, False),
    b"E0000 00:00:1795486099.462583   16369 util.cc:131] oneDNN supports DT_INT8 only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.\n": (False, False),
    b"E0000 00:00:1795533913.647856    3943 util.cc:131] oneDNN supports DT_INT64 only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.\n": (False, False),
    b"error: /data: no such file or directory\n": (True, True),
    b"Traceback (most recent call last):\n": (True, True),
    b"INFO:tensorflow:Assets written to: /tmp/e.tmp-1/saved_model/assets\n": (False, False),
    b"WARNING:tensorflow:5 out of the last 5 calls to <function> triggered tf.function retracing.\n": (True, True),
}


@pytest.mark.parametrize("line", sorted(LINES))
def test_what_reaches_the_console(line):
    without_gpu, with_gpu = LINES[line]
    assert console.keep(line, gpu=False) == without_gpu
    assert console.keep(line, gpu=True) == with_gpu


def test_a_pipeline_prints_its_own_lines_and_tf_logs_brings_tensorflows_back(tmp_path):
    args = ["-m", "pipelines.prepare_data", f"--corpus={tmp_path / 'absent'}", f"--data_dir={tmp_path / 'd'}"]
    quiet = run(args, check=False, TF_CPP_MIN_LOG_LEVEL="0")
    assert quiet.returncode == 1
    assert quiet.stderr.splitlines() == [f"error: {tmp_path / 'absent'}: no such file or directory"], quiet.stderr
    assert not CPP_NOISE.search(quiet.stdout)
    loud = run(args + ["--tf_logs"], check=False)
    assert loud.returncode == 1 and CPP_NOISE.search(loud.stderr) and loud.stderr.rstrip().endswith("directory")
    env = run(args, check=False, TFLLM_TF_LOGS="1")
    assert CPP_NOISE.search(env.stderr)


@pytest.mark.parametrize("tf_logs", ["0", "1"])
def test_a_launchers_stderr_through_the_filter(tf_logs):
    """What `make demo` does with horovodrun's stderr, whose build check imports TensorFlow."""
    import subprocess

    from conftest import BIN, subprocess_env

    script = ("import sys, tensorflow as tf; tf.config.list_physical_devices(); "
              "print('error: from the launcher', file=sys.stderr)")
    proc = subprocess.run(["bash", "-c", f'"{BIN}/python" -c "{script}" 2> >("{BIN}/python" -m tfllm.console >&2); wait'],
                          capture_output=True, text=True, timeout=120, env={**subprocess_env(), "TFLLM_TF_LOGS": tf_logs})
    assert proc.returncode == 0 and "error: from the launcher" in proc.stderr
    assert bool(CPP_NOISE.search(proc.stderr)) == (tf_logs == "1"), proc.stderr


def test_the_console_is_written_out_at_exit_while_a_child_still_holds_stderr():
    """A one-process Horovod run forks Open MPI's singleton orted, which keeps the process' stderr
    until after it exits: the copier must stop at this process' last line, not wait for the pipe."""
    script = """if True:
        import os, subprocess
        from tfllm import console
        console.quiet_tensorflow([])
        child = subprocess.Popen(["sleep", "60"])  # inherits fd 2, as orted does
        copier = console._state["thread"]
        os.write(2, b"I0000 00:00:1.5   16699 port.cc:153] dropped\\nkept\\nlast, without a newline")
        console.restore()
        print("copier still running" if copier.is_alive() else "copier done", flush=True)
        child.kill()
        child.wait()
    """
    proc = run(["-c", script], TFLLM_TF_LOGS="0")
    assert proc.stdout.strip() == "copier done"
    assert proc.stderr == "kept\nlast, without a newline"


def test_a_forked_child_that_exits_leaves_its_parents_console_running():
    script = """if True:
        import os, sys
        from tfllm import console
        console.quiet_tensorflow([])
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs the child's atexit hooks, restore() among them
        os.waitpid(pid, 0)
        os.write(2, b"written after the child exited\\n")
    """
    proc = run(["-c", script], TFLLM_TF_LOGS="0")
    assert proc.stderr == "written after the child exited\n"
