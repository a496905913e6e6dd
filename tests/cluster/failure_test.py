"""Failure drills across emulated hosts: every case ends within a bound, non-zero, naming the
host or rank, and the rerun resumes from an intact checkpoint with the uninterrupted losses.

Bounds (README, "Failures across hosts"): a dead rank ends the job within seconds; a cut link
within the ssh keepalive (15 s, k8s/images/ssh_config) or Gloo's timeout (30 s), whichever
comes first; BOUND_S leaves room for this 2-core machine's load.
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cluster_fixtures import (TINY, cluster, horovodrun, launch, mpirun, rank_pids, start,  # noqa: F401
                              wait_for)
from conftest import run
from pretrain_helpers import logged_losses

pytestmark = pytest.mark.slow
BOUND_S = 60
LONG = ["--train_steps=3000", "--checkpoint_every=4", "--eval_every=0", "--sample_prompt="]
REFERENCE_STEPS = 160


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run of the same schedule (2 hosts give the same losses: launch_test)."""
    tmp = tmp_path_factory.mktemp("reference")
    run(TINY + [f"--model_dir={tmp / 'model'}", f"--data_dir={tmp / 'data'}", *LONG,
                f"--stop_after={REFERENCE_STEPS}"], launcher="gloo")
    return tmp / "data", logged_losses(tmp / "model")


def launcher(kind, c):
    return horovodrun(c, ["h1", "h2"]) if kind == "gloo" else mpirun(c, ["h1", "h2"])


def assert_checkpoints_whole(model_dir):
    ckpts = model_dir / "checkpoints"
    names = [n for n in os.listdir(ckpts) if n.startswith("ckpt-")]
    assert names and all((ckpts / n / "state.json").exists() and (ckpts / n / "variables.npz").exists()
                         for n in names), names
    index = json.loads((ckpts / "index.json").read_text())
    assert index["latest"] in names


def rerun_matches_reference(c, kind, model_dir, reference):
    """The same command again resumes from the latest checkpoint, then follows the reference."""
    data, ref = reference
    assert_checkpoints_whole(model_dir)
    proc = launch(c, launcher(kind, c) + TINY + [f"--model_dir={model_dir}", f"--data_dir={data}", *LONG,
                                                 "--stop_after=6"])
    resumed = int(proc.stdout.split("resumed from step ")[1].split()[0])
    assert 8 <= resumed <= REFERENCE_STEPS - 6
    after = logged_losses(model_dir)
    steps = range(resumed + 1, resumed + 7)
    np.testing.assert_allclose([after[s] for s in steps], [ref[s] for s in steps], rtol=1e-6)


def start_long_run(c, kind, model_dir, reference, tmp_path):
    job = start(c, launcher(kind, c) + TINY + [f"--model_dir={model_dir}", f"--data_dir={reference[0]}", *LONG],
                tmp_path / "job.log")
    wait_for(model_dir / "checkpoints" / "ckpt-00000008" / "state.json", job=job)
    return job


def wait_exit(job, log):
    started = time.monotonic()
    try:
        job.wait(BOUND_S)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the launcher was still running {BOUND_S} s after the failure:\n"
                             f"{log.read_text()[-3000:]}")
    return time.monotonic() - started


@pytest.mark.parametrize("kind", ["gloo", "mpi"])
def test_remote_rank_killed(cluster, kind, reference, tmp_path):
    model_dir = tmp_path / "model"
    job = start_long_run(cluster, kind, model_dir, reference, tmp_path)
    victims = rank_pids(cluster, "h2")
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    elapsed = wait_exit(job, tmp_path / "job.log")
    log = (tmp_path / "job.log").read_text()
    assert job.returncode != 0, log[-3000:]
    # horovodrun names the rank (and tfllm's start-up line maps ranks to hosts); mpirun the host.
    assert ("Process name: 1" in log) if kind == "gloo" else ("on node h2" in log), log[-3000:]
    assert "h2 (rank 1)" in log
    print(f"{kind}: rank killed -> launcher exit {job.returncode} after {elapsed:.1f} s")
    rerun_matches_reference(cluster, kind, model_dir, reference)


@pytest.mark.parametrize("kind", ["gloo", "mpi"])
def test_link_cut(cluster, kind, reference, tmp_path):
    model_dir = tmp_path / "model"
    job = start_long_run(cluster, kind, model_dir, reference, tmp_path)
    cluster.link_down("h2")
    elapsed = wait_exit(job, tmp_path / "job.log")
    log = (tmp_path / "job.log").read_text()
    assert job.returncode != 0, log[-3000:]
    # horovodrun names the rank; mpirun 4.1 only says that it lost a daemon, without naming it.
    assert ("Process name: 1" in log) if kind == "gloo" else ("ORTE" in log), log[-3000:]
    print(f"{kind}: link cut -> launcher exit {job.returncode} after {elapsed:.1f} s")
    # The cut-off host's processes cannot hear anyone; the host comes back as a rebooted node would.
    for pid in rank_pids(cluster, "h2"):
        os.kill(pid, signal.SIGKILL)
    cluster.link_up("h2")
    rerun_matches_reference(cluster, kind, model_dir, reference)


@pytest.mark.parametrize("kind", ["gloo", "mpi"])
def test_sigterm_to_launcher_stops_every_rank_at_one_step_with_a_checkpoint(cluster, kind, reference, tmp_path):
    model_dir = tmp_path / "model"
    job = start_long_run(cluster, kind, model_dir, reference, tmp_path)
    job.send_signal(signal.SIGTERM)
    elapsed = wait_exit(job, tmp_path / "job.log")
    # horovodrun 0.28.1 returns as soon as it has killed its ssh clients; the ranks then notice
    # that their launcher is gone (tfllm/launcher_watch.py) and stop as SIGTERM stops them.
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and (rank_pids(cluster, "h1") or rank_pids(cluster, "h2")):
        time.sleep(0.2)
    assert not rank_pids(cluster, "h1") and not rank_pids(cluster, "h2"), "ranks outlived their launcher"
    if kind == "mpi":
        assert job.returncode != 0
        # mpirun relays every rank's stderr: rank 0, which saved, reports the stop; rank 1 does not.
        assert (tmp_path / "job.log").read_text().count("tfllm: stopped by signal at step") == 1
    # Every rank stopped after the same step: the checkpoint rank 0 saved is the last logged step.
    index = json.loads((model_dir / "checkpoints" / "index.json").read_text())
    last = max(logged_losses(model_dir))
    assert index["latest"] == f"ckpt-{last:08d}"
    print(f"{kind}: SIGTERM -> launcher exit {job.returncode} after {elapsed:.1f} s, checkpoint at step {last}")
    rerun_matches_reference(cluster, kind, model_dir, reference)


@pytest.mark.parametrize("kind", ["gloo", "mpi"])
def test_host_without_sshd_at_launch(cluster, kind, reference, tmp_path):
    model_dir = tmp_path / "model"
    launch(cluster, launcher(kind, cluster) + TINY + [f"--model_dir={model_dir}", f"--data_dir={reference[0]}",
                                                      *LONG, "--stop_after=8"])
    cluster.stop_sshd("h2")
    started = time.monotonic()
    proc = launch(cluster, launcher(kind, cluster) + TINY + [f"--model_dir={model_dir}",
                                                             f"--data_dir={reference[0]}", *LONG],
                  check=False, timeout=BOUND_S)
    assert proc.returncode != 0
    assert "h2" in proc.stdout + proc.stderr and "Connection refused" in proc.stdout + proc.stderr
    print(f"{kind}: no sshd on h2 -> launcher exit {proc.returncode} after {time.monotonic() - started:.1f} s")
    cluster.start_sshd("h2")
    rerun_matches_reference(cluster, kind, model_dir, reference)
