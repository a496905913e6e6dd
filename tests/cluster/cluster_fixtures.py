"""Pytest fixtures and launch helpers for tests on the emulated cluster (tests/cluster/emulated.py).

Test modules import the fixtures by name (`from cluster_fixtures import cluster`). A fixture
always tears its cluster down, also when the test fails or is interrupted; where namespaces
cannot be created, the test fails with the one-line reason (never a silent skip).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import yaml

from conftest import BIN, REPO, subprocess_env
from emulated import Cluster, ClusterError
from pretrain_helpers import TINY

assert TINY[:3] == ["-m", "pipelines.pretrain", "--flagfile=flags/tiny.cfg"]
SMALL = TINY[3:]  # the test-size flags alone, to append to a launcher command that names its flagfile


def _start(hosts: int, workdir, pin: bool = False) -> Cluster:
    try:
        return Cluster(hosts, workdir=workdir, pin=pin).start()
    except ClusterError as e:
        pytest.fail(f"emulated cluster unavailable: {e}", pytrace=False)


@pytest.fixture
def cluster(tmp_path):
    """Two hosts, fresh for each test (failure drills change links and daemons)."""
    c = _start(2, tmp_path / "cluster")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    """Three hosts shared by a module's tests that leave the cluster as they found it."""
    c = _start(3, tmp_path_factory.mktemp("cluster3"))
    try:
        yield c
    finally:
        c.stop()


def horovodrun(c: Cluster, hosts: list[str], *, extra: tuple[str, ...] = ()) -> list[str]:
    spec = ",".join(f"{h}:1" for h in hosts)
    # --disable-cache: horovodrun otherwise remembers for an hour that a host answered ssh.
    return [str(BIN / "horovodrun"), "-np", str(len(hosts)), "-H", spec, "--gloo", "--disable-cache",
            "--ssh-identity-file", str(c.key), *extra, sys.executable]


def mpirun(c: Cluster, hosts: list[str], *, extra: tuple[str, ...] = ()) -> list[str]:
    """mpirun as mpi-operator's launcher runs it: the hostfile from the environment, no -np."""
    c.hostfile(1, hosts)
    return ["mpirun", "--bind-to", "none", "-x", "PATH", "-x", "PYTHONUNBUFFERED", "-x", "TF_CPP_MIN_LOG_LEVEL",
            *extra, "python"]


def launcher_env(c: Cluster, **extra) -> dict:
    """The launcher pod's environment: the venv first on PATH, mpi-operator's hostfile variable."""
    return subprocess_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                          OMPI_MCA_orte_default_hostfile=c.workdir / "hostfile",
                          OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, **extra)


def launch(c: Cluster, argv: list[str], timeout: float = 300, check: bool = True, cwd=REPO, env=None):
    """Runs argv in the launcher namespace; on failure the output is in the assertion."""
    proc = c.run(argv, cwd=str(cwd), env=env or launcher_env(c), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start(c: Cluster, argv: list[str], log: pathlib.Path, cwd=REPO, env=None) -> subprocess.Popen:
    """Starts argv in the launcher namespace in the background, output to `log`."""
    out = open(log, "w")
    return c.popen(c.launcher, argv, cwd=str(cwd), env=env or launcher_env(c), stdout=out, stderr=subprocess.STDOUT)


def wait_for(path: pathlib.Path, timeout: float = 180, job: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        if job is not None and job.poll() is not None:
            break
        time.sleep(0.1)
    assert path.exists(), f"{path} did not appear within {timeout} s"


def rank_pids(c: Cluster, host: str) -> list[int]:
    """The pretraining ranks running on a host (python processes of pipelines.pretrain)."""
    found = []
    for pid in c.pids(host):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipelines.pretrain" in argv and b"python" in os.path.basename(argv[0]):
            found.append(pid)
    return found


def cpu_smoke_launcher(pod_root: pathlib.Path) -> list[str]:
    """The cpu-smoke overlay's launcher command, read from `kubectl kustomize` output.

    The pod's paths map onto `pod_root`: the ConfigMap's flagfiles are written to
    <pod_root>/etc/tfllm/flags (the launcher's working directory in the pod, /etc/tfllm) and the
    shared volume /data becomes <pod_root>/data.
    """
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / "cpu-smoke")], capture_output=True,
                         text=True, check=True).stdout
    docs = list(yaml.safe_load_all(out))
    job = next(d for d in docs if d["kind"] == "MPIJob")
    flags = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tfllm-flags")
    container = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    workdir = pod_root / "etc" / "tfllm"
    (workdir / "flags").mkdir(parents=True, exist_ok=True)
    for name, text in flags["data"].items():
        (workdir / "flags" / name).write_text(text)
    assert container["workingDir"] == "/etc/tfllm"
    return [a.replace("/etc/tfllm", str(workdir)).replace("/data/", f"{pod_root}/data/")
            for a in container["command"] + container["args"]]
