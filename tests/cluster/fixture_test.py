"""The emulated cluster leaves nothing behind: no namespace, process or /etc/netns entry, even
when the test using it fails; and a second cluster in the same run starts clean."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO
from cluster_fixtures import _start
from emulated import NETNS_ETC, _netns_list

pytestmark = pytest.mark.slow

FAILING = """
import os, sys
sys.path[:0] = [{cluster_dir!r}, {tests_dir!r}]
from cluster_fixtures import cluster  # noqa: F401

def test_fails_with_processes_running(cluster):
    sleeper = cluster.popen("h1", ["sleep", "300"])
    open({pids!r}, "w").write(" ".join(map(str, [sleeper.pid] + cluster.pids("h1") + cluster.pids("h2"))))
    open({names!r}, "w").write(" ".join(cluster.namespaces))
    assert cluster.run(["ssh", "h2", "hostname"]).stdout.strip() == "h2"
    assert False, "this test fails on purpose"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return pathlib.Path(f"/proc/{pid}").exists() and "Z" not in pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_failing_test_leaves_no_namespace_process_or_mount(tmp_path):
    before = set(_netns_list())
    test = tmp_path / "inner_test.py"
    pids, names = tmp_path / "pids", tmp_path / "names"
    test.write_text(FAILING.format(cluster_dir=str(REPO / "tests" / "cluster"), tests_dir=str(REPO / "tests"),
                                   pids=str(pids), names=str(names)))
    for attempt in range(2):  # the second fixture in a fresh run starts as clean as the first
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "this test fails on purpose" in proc.stdout, proc.stdout[-3000:]
        started = [int(p) for p in pids.read_text().split()]
        namespaces = names.read_text().split()
        assert len(started) >= 3 and len(namespaces) == 4
        assert not [p for p in started if _alive(p)]
        assert set(_netns_list()) == before
        assert not [n for n in namespaces if (NETNS_ETC / n).exists()]
        mounts = pathlib.Path("/proc/self/mounts").read_text()
        assert not [n for n in namespaces if f"/run/netns/{n}" in mounts]


def test_pinned_hosts_run_what_ssh_starts_on_a_core_each(tmp_path):
    """cluster_bench --pin: a host of its own has its own core, and so does everything launched there."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.fail(f"pinning needs 2 cores; this machine lets the tests use {cores}", pytrace=False)
    cluster = _start(3, tmp_path / "cluster", pin=True)
    try:
        allowed = {h: cluster.run(["ssh", h, "grep", "Cpus_allowed_list", "/proc/self/status"]).stdout.split()[-1]
                   for h in ("h1", "h2", "h3")}
        launcher = cluster.run(["grep", "Cpus_allowed_list", "/proc/self/status"]).stdout.split()[-1]
    finally:
        cluster.stop()
    assert allowed == {"h1": str(cores[0]), "h2": str(cores[1]), "h3": str(cores[2 % len(cores)])}
    assert launcher != str(cores[0])  # the launcher is not pinned
