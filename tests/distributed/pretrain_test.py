"""Pretraining with 2 real ranks: both launchers, resume, and a rank killed with SIGKILL."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, launcher_command, subprocess_env
from pretrain_helpers import TINY, event_tags, logged_losses, pretrain

pytestmark = pytest.mark.slow
FLAGS = ["--train_steps=10", "--eval_every=5", "--checkpoint_every=5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data2")
    proc = pretrain(tmp / "gloo", *FLAGS, launcher="gloo", data_dir=tmp / "data")
    pytest.gloo_run = (tmp / "gloo", proc)
    return tmp / "data"


def test_gloo_two_ranks_end_to_end(data_dir):
    model_dir, proc = pytest.gloo_run
    assert "world 2 (gloo: " in proc.stdout
    assert proc.stdout.count("val_loss=") == 1  # rank 0 alone reports
    # Every line once, from rank 0, and none of TensorFlow's C++ start-up notices from any rank.
    # (horovodrun's own build check imports TensorFlow in a subprocess of the launcher: its notices
    # reach the launcher's stderr, outside tfllm.)
    assert all(line.startswith("[0]<") for line in proc.stdout.splitlines() if line.strip()), proc.stdout[-3000:]
    assert not re.search(r"^\[\d\]<std\w+>:([IWEF]0000 |.*absl::InitializeLog|.*cuda|.*CUDA)", proc.stdout, re.M)
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["ckpt-00000005", "ckpt-00000010", "index.json"]
    tags = event_tags(model_dir / "tb")
    assert {"loss", "optimizer/learning_rate", "optimizer/grad_norm", "perf/tokens_per_sec", "sample"} <= tags["train"]
    assert {"loss", "metrics/perplexity"} <= tags["validation"]


def test_mpirun_two_ranks_matches_gloo(tmp_path, data_dir):
    proc = pretrain(tmp_path / "mpi", *FLAGS, launcher="mpi", data_dir=data_dir)
    assert "world 2 (mpi: " in proc.stdout
    gloo = logged_losses(pytest.gloo_run[0])
    mpi = logged_losses(tmp_path / "mpi")
    np.testing.assert_allclose([mpi[s] for s in range(1, 11)], [gloo[s] for s in range(1, 11)], rtol=1e-5)


def test_two_rank_stop_and_resume_matches_uninterrupted(tmp_path, data_dir):
    model_dir = tmp_path / "resume"
    pretrain(model_dir, *FLAGS, "--stop_after=3", launcher="gloo", data_dir=data_dir)
    second = pretrain(model_dir, *FLAGS, launcher="gloo", data_dir=data_dir)
    assert "resumed from step 3" in second.stdout
    straight, resumed = logged_losses(pytest.gloo_run[0]), logged_losses(model_dir)
    np.testing.assert_allclose([resumed[s] for s in range(1, 11)], [straight[s] for s in range(1, 11)], rtol=1e-6)


def _rank_pids(model_dir) -> dict[int, int]:
    """Worker processes of this run by Horovod rank (from their environment)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"pipelines.pretrain" not in cmdline or f"--model_dir={model_dir}".encode() not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"HOROVOD_RANK" in env:
            found[int(env[b"HOROVOD_RANK"])] = int(pid)
    return found


def test_sigkill_of_one_rank_then_rerun_resumes_and_finishes(tmp_path, data_dir):
    model_dir = tmp_path / "killed"
    args = TINY + [f"--model_dir={model_dir}", f"--data_dir={data_dir}", "--train_steps=400", "--checkpoint_every=4",
                   "--eval_every=0"]
    cmd = launcher_command("gloo", 2) + [sys.executable] + args
    job = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    ckpt = model_dir / "checkpoints" / "ckpt-00000008" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint at step 8 in time"
    pids = _rank_pids(model_dir)
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGKILL)
    try:
        job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
    assert job.returncode != 0
    rerun = pretrain(model_dir, "--train_steps=24", "--checkpoint_every=4", "--eval_every=0", launcher="gloo",
                     data_dir=data_dir)
    resumed_at = int(rerun.stdout.split("resumed from step ")[1].split()[0])
    assert resumed_at >= 8 and resumed_at % 4 == 0
    assert (model_dir / "checkpoints" / "ckpt-00000024" / "state.json").exists()
