import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from conftest import REPO, subprocess_env
from tfllm.checkpoint import CheckpointError, CheckpointManager


def variables(n=3, value=0.0, shape=(4,)):
    return [keras.Variable(np.full(shape, value + i, np.float32), name=f"v{i}") for i in range(n)]


def test_save_restore_round_trip_and_state(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    src = variables(value=1.0)
    path = mgr.save(7, src, {"epoch": 2}, val_loss=1.5)
    dst = variables(value=0.0)
    state = mgr.restore(mgr.latest(), dst)
    assert path == mgr.latest() and state["step"] == 7 and state["epoch"] == 2 and state["val_loss"] == 1.5
    for a, b in zip(src, dst):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keeps_last_n_and_the_best(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}
    for step, loss in losses.items():
        mgr.save(step, variables(), {}, val_loss=loss)
    assert mgr.complete() == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000005"]
    assert mgr.best() == {"name": "ckpt-00000002", "step": 2, "val_loss": 1.0}
    assert mgr.resolve("best").endswith("ckpt-00000002") and mgr.resolve("4").endswith("ckpt-00000004")
    with pytest.raises(CheckpointError, match="no checkpoint '3'"):
        mgr.resolve("3")


def test_mismatched_model_is_a_clear_error(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, variables(n=3), {})
    with pytest.raises(CheckpointError, match="holds 3 variables.*4"):
        mgr.restore(mgr.latest(), variables(n=4))
    with pytest.raises(CheckpointError, match=r"shape \(4,\) in the checkpoint, \(5,\) in this model"):
        mgr.restore(mgr.latest(), variables(n=3, shape=(5,)))


def test_crash_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, variables(value=1.0), {})

    def crash(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, variables(value=2.0), {})
    monkeypatch.undo()
    assert mgr.latest().endswith("ckpt-00000001")
    dst = variables()
    mgr.restore(mgr.latest(), dst)
    assert dst[0].numpy()[0] == 1.0
    mgr.save(3, variables(value=3.0), {})  # the next save sweeps the debris of the crashed one
    assert not [n for n in os.listdir(mgr.dir) if n.startswith(".tmp-")]


SAVER = textwrap.dedent("""
    import sys, keras, numpy as np
    from tfllm.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep=2)
    big = [keras.Variable(np.full((512, 1024), float(i), np.float32)) for i in range(8)]
    step = 0
    while True:
        step += 1
        for v in big:
            v.assign(np.full(v.shape, float(step), np.float32))
        mgr.save(step, big, {"marker": step})
        print(step, flush=True)
""")


def test_sigkill_during_saves_never_exposes_a_half_written_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=REPO, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mgr = CheckpointManager(str(tmp_path / "ckpt"))
        latest = mgr.latest()
        state = CheckpointManager.read_state(latest)
        dst = [keras.Variable(np.zeros((512, 1024), np.float32)) for _ in range(8)]
        mgr.restore(latest, dst)
        assert all(float(v.numpy()[0, 0]) == state["marker"] for v in dst)
        index = json.loads(open(os.path.join(mgr.dir, "index.json")).read())
        assert os.path.exists(os.path.join(mgr.dir, index["latest"], "state.json"))
