"""TensorBoard, as an operator opens it: a real `tensorboard` server over a tiny run's logs, read
through the same HTTP data API its dashboards use."""

import contextlib
import gzip
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import BIN, run, subprocess_env
from finetune_helpers import finetune_args
from pretrain_helpers import pretrain

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb-run")
    proc = pretrain(tmp / "model", "--train_steps=20", "--log_every=5", "--eval_every=10", "--sample_every=10",
                    "--checkpoint_every=10", "--profile_steps=3,4", data_dir=tmp / "data")
    return tmp / "model", proc


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


@contextlib.contextmanager
def tensorboard(log_dir, ready):
    """A tensorboard server on a loopback port, up once `ready(base)` holds; stopped (by its PID)
    whatever the tests do."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "tensorboard"), f"--logdir={log_dir}", "--host=127.0.0.1", f"--port={port}"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:  # the first load of the logs happens in the background
            try:
                if ready(base):
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError(f"tensorboard did not serve {log_dir} within 90 s (exit {proc.poll()})")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def board(run_dir):
    def ready(base):
        tags = get(base, "data/plugin/scalars/tags")
        return "loss" in tags.get("train", {}) and "loss" in tags.get("validation", {})
    with tensorboard(run_dir / "tb", ready) as base:
        yield base


def fetch(base: str, path: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":  # the profile plugin compresses
            body = gzip.decompress(body)
        return body


def get(base: str, path: str, body: dict | None = None):
    return json.loads(fetch(base, path, body))


def test_scalars_match_metrics_jsonl(board, run_dir):
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    for tag in ("loss", "optimizer/learning_rate", "optimizer/grad_norm", "perf/tokens_per_sec"):
        points = get(board, f"data/plugin/scalars/scalars?run=train&tag={urllib.parse.quote(tag)}")
        key = tag.split("/")[-1]
        assert [p[1] for p in points] == [r["step"] for r in logged], tag
        assert [p[2] for p in points] == pytest.approx([r[key] for r in logged], rel=1e-6), tag
    val = get(board, "data/plugin/scalars/scalars?run=validation&tag=loss")
    assert [p[1] for p in val] == [10, 20] and all(p[2] > 0 for p in val)
    assert set(get(board, "data/runs")) >= {"train", "validation"}


def test_the_loss_group_comes_first_and_the_rest_group_by_kind(board):
    """TensorBoard sorts its card groups (a tag's first path component) by name."""
    tags = get(board, "data/plugin/scalars/tags")
    groups = sorted({t.split("/")[0] for run in ("train", "validation") for t in tags[run]})
    assert groups == ["loss", "metrics", "optimizer", "perf", "progress"], groups
    assert {"loss", "metrics/perplexity", "metrics/accuracy"} == set(tags["validation"])


def test_text_tab_shows_prompt_and_sample_apart(board):
    assert get(board, "data/plugin/text/tags") == {"train": ["sample"]}
    samples = get(board, "data/plugin/text/text?run=train&tag=sample")
    assert [s["step"] for s in samples] == [10, 20]
    html = samples[-1]["text"]
    assert "<strong>prompt</strong>" in html and "<strong>continuation</strong>, top_k (k=10, temperature 0.8, seed 0)" in html
    assert html.count("<pre><code>") == 2


def test_hparams_lists_the_run(board):
    experiment = get(board, "data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"learning_rate", "batch_size", "model.family"} <= {h["name"] for h in experiment["hparamInfos"]}
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert metrics == {("validation", "loss"), ("train", "loss")}
    groups = get(board, "data/plugin/hparams/session_groups",
                 {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                            "STATUS_RUNNING"],
                  "colParams": [], "startIndex": 0, "sliceSize": 10})
    assert groups["totalSize"] == 1


def test_the_final_sample_is_what_pipelines_generate_draws_with_the_same_settings(trained):
    model_dir, proc = trained
    said = proc.stdout.split("sample at step 20, top_k (k=10, temperature 0.8, seed 0):\n", 1)[1]
    sample = said.split("\n" + "-" * 60, 1)[0]
    prompt = json.loads((model_dir / "config.json").read_text())["train"]["sample_prompt"]
    out = run(["-m", "pipelines.generate", f"--model_dir={model_dir}", f"--prompt={prompt}", "--strategy=top_k",
               "--top_k=10", "--temperature=0.8", "--sampling_seed=0", "--max_new_tokens=16"])
    assert out.stdout.rstrip("\n") == sample


def test_bad_sample_settings_are_one_error_line(tmp_path):
    proc = pretrain(tmp_path / "m", "--sample_strategy=top_p", "--sample_top_p=1.5", check=False,
                    data_dir=tmp_path / "d")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: --sample_top_p=1.5: must be in (0, 1]"


def test_profile_tab_lists_the_traced_steps(board, trained):
    model_dir, proc = trained
    assert f"profile of steps 3-4: {model_dir / 'tb' / 'profile-rank0'}" in proc.stdout
    runs = get(board, "data/plugin/profile/runs")
    assert any(r.startswith("profile-rank0") for r in runs), runs
    tools = get(board, f"data/plugin/profile/run_tools?run={urllib.parse.quote(runs[0])}")
    assert "trace_viewer" in " ".join(tools), tools
    assert list((model_dir / "tb" / "profile-rank0" / "plugins" / "profile").glob("*/*.xplane.pb"))


@pytest.mark.parametrize("flag,message", [("--profile_steps=4", "expected two step numbers, A,B"),
                                          ("--profile_steps=5,3", "expected 1 <= A <= B <= --train_steps")])
def test_bad_profile_steps_are_one_error_line(tmp_path, flag, message):
    proc = pretrain(tmp_path / "m", flag, check=False, data_dir=tmp_path / "d")
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists()


TRAIN_BLUE, VALIDATION_RED = (0, 119, 187), (204, 51, 17)  # TensorBoard's colours for the first two runs


def test_scalars_dashboard_draws_the_loss_chart_in_chromium(board, tmp_path_factory):
    """What a user sees: headless Chromium renders the scalars dashboard, filtered to the loss."""
    import shutil

    import numpy as np
    import tensorflow as tf

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing: .ci/test-tools.sh installs it (make test runs it)"
    shot = tmp_path_factory.getbasetemp() / "tensorboard-scalars.png"
    proc = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={shot}",
                           f"{board}/#scalars&tagFilter=%5Eloss%24"], capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-2000:]
    print(f"screenshot: {shot}")
    pixels = tf.io.decode_png(shot.read_bytes(), channels=3).numpy().astype(int)
    chart = pixels[190:430, 380:720]  # the first card: the loss chart's plot area

    def count(colour):
        return int((np.abs(chart - np.array(colour)).sum(axis=-1) < 30).sum())
    # both runs' loss lines are drawn in the chart
    assert count(TRAIN_BLUE) > 50 and count(VALIDATION_RED) > 10, (count(TRAIN_BLUE), count(VALIDATION_RED), shot)


@pytest.fixture(scope="module")
def finetuned(run_dir, sst2_slice, tmp_path_factory):
    """The tiny pretrained run, fine-tuned on an SST-2 slice for 20 steps (validation at 10 and 20)."""
    clf_dir = tmp_path_factory.mktemp("tb-finetune") / "clf"
    proc = run(finetune_args(run_dir, clf_dir, sst2_slice))
    return clf_dir, proc


@pytest.fixture(scope="module")
def finetune_board(finetuned):
    def ready(base):
        return "confusion_matrix" in get(base, "data/plugin/images/tags").get("validation", {})
    with tensorboard(finetuned[0] / "tb", ready) as base:
        yield base


def test_finetuning_shows_accuracy_and_a_readable_confusion_matrix(finetuned, finetune_board):
    import numpy as np
    import tensorflow as tf

    said = re.findall(r"^validation step (\d+): accuracy=([\d.]+)", finetuned[1].stdout, re.M)
    points = get(finetune_board, "data/plugin/scalars/scalars?run=validation&tag=metrics%2Faccuracy")
    assert [(str(p[1]), f"{p[2]:.4f}") for p in points] == said and len(said) == 2
    images = get(finetune_board, "data/plugin/images/images?run=validation&tag=confusion_matrix&sample=0")
    assert [i["step"] for i in images] == [10, 20]
    png = fetch(finetune_board, f"data/plugin/images/individualImage?{images[-1]['query']}")
    pixels = tf.io.decode_png(png, channels=3).numpy()
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, pixels.shape
    cells = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert cells > 20  # drawn: cell shades, digits and labels, not a blank image
    experiment = get(finetune_board, "data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"init", "pooling", "learning_rate", "classes"} <= {h["name"] for h in experiment["hparamInfos"]}
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert metrics == {("validation", "metrics/accuracy"), ("validation", "loss"), ("train", "loss")}
