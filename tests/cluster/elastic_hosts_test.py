"""Elastic pretraining across emulated hosts: a host leaves and comes back, a worker is killed,
too few workers remain. The same processes train on through every change (no restart, no
checkpoint read), and the data order holds: every window of an epoch once over the committed steps."""

import collections
import contextlib
import json
import os
import pathlib
import re
import signal
import sys
import time

import pytest

from cluster_fixtures import TINY, cluster3, rank_pids, start  # noqa: F401
from conftest import BIN

pytestmark = pytest.mark.slow
COMMIT = 5
# A small corpus, so that the run spans epochs: ~900 windows of 64, 24 per step at 3 ranks.
ELASTIC = ["--max_corpus_bytes=60000", "--eval_every=0", "--checkpoint_every=0", "--sample_prompt=", "--elastic",
           f"--elastic_commit_every={COMMIT}"]
BOUND_S = 120


def elastic_horovodrun(c, hosts_file: pathlib.Path, np_: int, min_np: int, max_np: int, timeout: int = 60):
    script = hosts_file.with_suffix(".sh")
    script.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
    script.chmod(0o755)
    return [str(BIN / "horovodrun"), "-np", str(np_), "--min-np", str(min_np), "--max-np", str(max_np),
            "--host-discovery-script", str(script), "--slots-per-host", "1", "--elastic-timeout", str(timeout),
            "--gloo", "--disable-cache", "--ssh-identity-file", str(c.key), sys.executable]


def steps_done(model_dir: pathlib.Path) -> int:
    path = model_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def wait_until(predicate, what: str, job, timeout: float = BOUND_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert job.poll() is None, f"the job ended ({job.returncode}) while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def manifest_windows(data_dir: pathlib.Path) -> int:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return sum(s["windows"] for s in manifest["splits"]["train"]["shards"])


def committed_order(sample_logs: list[pathlib.Path]) -> list[int]:
    """The windows of the committed steps, in global position order.

    A step that was rolled back is logged again by a later generation; its last generation's
    lines are the ones that count. Each step's lines must come from ranks 0..N-1 of one world.
    """
    lines = [json.loads(line) for p in sample_logs for line in p.read_text().splitlines()]
    last = {}
    for line in lines:
        last[line["step"]] = max(last.get(line["step"], -1), line["generation"])
    steps = collections.defaultdict(dict)
    for line in lines:
        if line["generation"] == last[line["step"]]:
            assert line["rank"] not in steps[line["step"]], f"step {line['step']} rank {line['rank']} twice"
            steps[line["step"]][line["rank"]] = line
    assert sorted(steps) == list(range(1, len(steps) + 1)), "a step is missing from the sample log"
    order = []
    for step in sorted(steps):
        ranks = steps[step]
        size = next(iter(ranks.values()))["size"]
        assert sorted(ranks) == list(range(size)), f"step {step}: ranks {sorted(ranks)} of {size}"
        per_rank = [ranks[r]["windows"] for r in range(size)]
        batch = len(per_rank[0])
        order += [w for r in range(size) for w in per_rank[r][:batch]]
    return order


def assert_each_window_once_per_epoch(order: list[int], windows: int, epochs: int) -> None:
    assert len(order) >= epochs * windows, f"only {len(order)} windows taken, {epochs} epochs of {windows} expected"
    for e in range(len(order) // windows):
        assert sorted(order[e * windows:(e + 1) * windows]) == list(range(windows)), f"epoch {e}"
    rest = order[(len(order) // windows) * windows:]
    assert len(set(rest)) == len(rest), "a window repeats in the last, partial epoch"


def redone_steps(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"\((\d+) steps? to redo\)", out)]


def pids_by_host(sample_logs) -> dict:
    found = collections.defaultdict(set)
    for p in sample_logs:
        _, host, pid = p.name.rsplit(".", 2)
        found[host].add(int(pid))
    return found


@contextlib.contextmanager
def elastic_job(cluster, tmp_path, hosts: list[str], min_np: int, steps: int, timeout: int = 60):
    """(hosts file, model dir, log, job) of an elastic run; the launcher is killed if still running."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(h + "\n" for h in hosts))
    model, log = tmp_path / "model", tmp_path / "job.log"
    argv = elastic_horovodrun(cluster, hosts_file, len(hosts), min_np, len(hosts), timeout) + TINY + [
        f"--model_dir={model}", f"--data_dir={tmp_path / 'data'}", *ELASTIC, f"--train_steps={steps}",
        f"--sample_log={tmp_path / 'samples'}"]
    job = start(cluster, argv, log)
    try:
        yield hosts_file, model, log, job
    finally:
        if job.poll() is None:
            job.kill()


def test_host_leaves_and_returns_in_the_same_processes_with_each_window_once(cluster3, tmp_path):
    # Enough steps that h3 rejoins before the end: its restart (ssh, TensorFlow import, model
    # build) takes several seconds, hundreds of this model's steps.
    with elastic_job(cluster3, tmp_path, ["h1", "h2", "h3"], 2, 1000) as (hosts, model, log, job):
        wait_until(lambda: steps_done(model) >= 12, "12 steps on 3 hosts", job, 300)
        hosts.write_text("h1\nh2\n")
        wait_until(lambda: "world 3 -> 2" in log.read_text(), "the ring re-formed without h3", job)
        at = steps_done(model)
        wait_until(lambda: steps_done(model) >= at + 12, "12 steps on 2 hosts", job)
        hosts.write_text("h1\nh2\nh3\n")
        wait_until(lambda: "world 2 -> 3" in log.read_text(), "h3 joined again", job)
        job.wait(timeout=BOUND_S * 3)
    out = log.read_text()
    assert job.returncode == 0, out[-4000:]
    # The same processes on h1 and h2 throughout (no restart); h3 ran a second one after it rejoined.
    samples = sorted(tmp_path.glob("samples.*"))
    pids = pids_by_host(samples)
    assert len(pids["h1"]) == 1 and len(pids["h2"]) == 1 and len(pids["h3"]) == 2, pids
    assert "resumed from step" not in out  # nothing was read back from disk
    assert all(n <= COMMIT for n in redone_steps(out)), redone_steps(out)
    assert "elastic: final weights identical on 3 rank(s)" in out
    assert re.search(r"elastic: generation 2: 3 rank\(s\)", out)
    assert_each_window_once_per_epoch(committed_order(samples), manifest_windows(tmp_path / "data"), 2)


def test_killed_worker_is_left_behind_and_the_run_finishes(cluster3, tmp_path):
    with elastic_job(cluster3, tmp_path, ["h1", "h2", "h3"], 2, 70) as (hosts, model, log, job):
        wait_until(lambda: steps_done(model) >= 12 and rank_pids(cluster3, "h3"), "12 steps on 3 hosts", job, 300)
        for pid in rank_pids(cluster3, "h3"):
            os.kill(pid, signal.SIGKILL)
        job.wait(timeout=BOUND_S * 3)
    out = log.read_text()
    assert job.returncode == 0, out[-4000:]
    assert "a collective failed; rolled back to the commit at step" in out, out[-4000:]
    assert redone_steps(out) and all(n <= COMMIT for n in redone_steps(out)), redone_steps(out)
    assert "world 3 -> 2" in out and "elastic: final weights identical on 2 rank(s)" in out
    assert steps_done(model) == 70
    samples = sorted(tmp_path.glob("samples.*"))
    assert_each_window_once_per_epoch(committed_order(samples), manifest_windows(tmp_path / "data"), 1)


def test_too_few_workers_ends_with_an_error_and_the_last_commit_saved(cluster3, tmp_path):
    with elastic_job(cluster3, tmp_path, ["h1", "h2"], 2, 3000, timeout=10) as (hosts, model, log, job):
        wait_until(lambda: steps_done(model) >= 12 and rank_pids(cluster3, "h2"), "12 steps on 2 hosts", job, 300)
        killed = time.monotonic()
        for pid in rank_pids(cluster3, "h2"):
            os.kill(pid, signal.SIGKILL)
        job.wait(timeout=BOUND_S)
        ended = time.monotonic() - killed
    out = log.read_text()
    print(f"ended {ended:.1f} s after the kill")
    assert job.returncode != 0, out[-4000:]
    assert ended < BOUND_S
    assert "enough resources to run at least 2 Horovod processes. Timeout after 10 seconds" in out, out[-4000:]
    assert re.search(r"elastic: the commit of step \d+ saved to \S+ckpt-\d+; waiting", out), out[-4000:]
    index = json.loads((model / "checkpoints" / "index.json").read_text())
    saved = json.loads((model / "checkpoints" / index["latest"] / "state.json").read_text())
    assert saved["step"] >= 10 and saved["step"] % COMMIT == 0, saved["step"]
