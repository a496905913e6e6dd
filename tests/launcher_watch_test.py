"""A rank whose launcher is gone (its stdout loses its reader) stops as SIGTERM stops it."""

import signal
import subprocess
import sys
import time

from conftest import REPO, subprocess_env

CHILD = """
import signal, sys, time
from tfllm import launcher_watch
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
print("watching" if launcher_watch.start() else "not watching", flush=True)
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
print("this line goes to /dev/null, not to a broken pipe", flush=True)
open(sys.argv[1], "w").write("stopped" if got else "still running")
"""


def test_lost_stdout_reader_sends_sigterm_and_later_prints_do_not_fail(tmp_path):
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], cwd=REPO, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"watching"
    started = time.monotonic()
    child.stdout.close()  # the launcher's end goes away, as when horovodrun kills its ssh client
    child.stderr.close()
    assert child.wait(30) == 0
    assert marker.read_text() == "stopped"
    assert time.monotonic() - started < 10


PRINTING = """
import signal, sys, time
from tfllm import launcher_watch
launcher_watch._watch = lambda poller: time.sleep(60)  # a watch thread that has not run yet
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
print("watching" if launcher_watch.start() else "not watching", flush=True)
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    print("step ...", flush=True)  # a busy rank's log line
    time.sleep(0.01)
open(sys.argv[1], "w").write(f"stopped {len(got)}" if got else "still running")
"""


def test_a_print_into_the_lost_reader_stops_the_rank_before_the_watch_does(tmp_path):
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", PRINTING, str(marker)], cwd=REPO, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"watching"
    child.stdout.close()
    child.stderr.close()
    assert child.wait(30) == 0  # no BrokenPipeError
    assert marker.read_text() == "stopped 1"


def test_terminal_or_file_output_is_not_watched(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from tfllm import launcher_watch; print(launcher_watch.start())"],
                         cwd=REPO, env=subprocess_env(), stdout=open(tmp_path / "out", "w"), stderr=subprocess.DEVNULL)
    assert out.returncode == 0
    assert (tmp_path / "out").read_text().strip() == "False"
