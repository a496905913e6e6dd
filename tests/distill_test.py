"""Distillation: the loss's arithmetic in process; students from a tiny teacher through the real command line."""

import json
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import run, run_many
from pretrain_helpers import TINY, pretrain

STUDENT = ["--train_steps=60", "--eval_every=0", "--checkpoint_every=0", "--sample_prompt=", "--eval_steps=0"]


def _tiny_models(vocab=64, seq=16):
    from tfllm.config import ModelConfig
    from tfllm.models import build_causal_lm

    import keras
    keras.utils.set_random_seed(1)
    cfg = dict(vocab_size=vocab, num_layers=2, num_heads=2, max_sequence_length=seq)
    teacher = build_causal_lm(ModelConfig(hidden_dim=64, **cfg))
    student = build_causal_lm(ModelConfig(hidden_dim=32, **cfg))
    windows = tf.random.stateless_uniform([3, seq + 1], [1, 2], minval=4, maxval=vocab, dtype=tf.int32)
    return teacher, student, tf.concat([windows[:, :-3], tf.zeros([3, 3], tf.int32)], 1)  # padded tails


def test_loss_is_hard_loss_plus_temperature_squared_kl():
    from tfllm.config import DistillConfig
    from tfllm.distill import DistillationLoss
    from tfllm.models import lm_loss_sums, split_window

    teacher, student, windows = _tiny_models()
    features, targets, mask = split_window(windows)
    t, alpha = 2.5, 0.3
    objective, correct, count, hard, kl = DistillationLoss(teacher, DistillConfig("t", t, alpha))(student, windows, False)
    plain = lm_loss_sums(student, windows, False)
    np.testing.assert_allclose([hard, correct, count], [float(x) for x in plain], rtol=1e-6)
    # KL(p_teacher || p_student) at temperature t, summed over real targets only.
    p = tf.nn.softmax(teacher(features) / t).numpy().astype(np.float64)
    q = tf.nn.softmax(student(features) / t).numpy().astype(np.float64)
    expected_kl = float(np.sum((p * (np.log(p) - np.log(q))).sum(-1) * mask.numpy()))
    assert float(count) == 3 * (16 - 3) and expected_kl > 0
    np.testing.assert_allclose(float(kl), expected_kl, rtol=1e-4)
    np.testing.assert_allclose(float(objective), (1 - alpha) * float(hard) + alpha * t * t * expected_kl, rtol=1e-4)
    # A student that is its teacher has nothing to learn from it.
    same = DistillationLoss(student, DistillConfig("t", t, alpha))(student, windows, False)
    assert abs(float(same[4])) < 1e-3


def test_bucketed_chain_computes_the_same_loss():
    from tfllm.config import DistillConfig
    from tfllm.distill import DistillationLoss

    teacher, student, windows = _tiny_models()
    loss = DistillationLoss(teacher, DistillConfig("t", 2.0, 0.5))
    chain = loss.chain(student)
    hidden = None
    for unit in [chain.embed, *chain.blocks, chain.top]:
        hidden = unit.call(hidden, windows, False)
    np.testing.assert_allclose([float(x) for x in chain.sums(hidden, windows)],
                               [float(x) for x in loss(student, windows, False)], rtol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Twice the student's width, trained 200 steps: far ahead of a 30-step student."""
    tmp = tmp_path_factory.mktemp("teacher")
    pretrain(tmp / "model", "--hidden_dim=64", "--train_steps=200", "--eval_every=0", "--checkpoint_every=0",
             "--sample_prompt=", "--log_every=50", data_dir=tmp / "data")
    return tmp / "model"


def distill_args(teacher_dir, model_dir, *extra):
    return ["-m", "pipelines.distill", *TINY[2:], f"--teacher_dir={teacher_dir}", f"--model_dir={model_dir}",
            "--distill_temperature=1", "--distill_alpha=0.5", *extra]


def distill(teacher_dir, model_dir, *extra, launcher="none", check=True):
    return run(distill_args(teacher_dir, model_dir, *extra), launcher=launcher, check=check)


def val_loss(proc) -> float:
    """The run's last `val_loss=` line (horovodrun prefixes it with the rank)."""
    return float(re.findall(r"(?:^|:)val_loss=([0-9.]+)$", proc.stdout, re.M)[-1])


@pytest.mark.parametrize("launcher", ["none", "gloo"])
def test_student_beats_the_same_student_from_scratch(teacher, tmp_path, launcher):
    data_dir = teacher.parent / "data"
    scratch = val_loss(pretrain(tmp_path / "scratch", *STUDENT, launcher=launcher, data_dir=data_dir))
    if launcher == "none":  # on data of its own, prepared with the teacher's tokenizer: the same windows
        student = distill(teacher, tmp_path / "student", *STUDENT, f"--data_dir={tmp_path / 'data'}")
    else:  # in two runs: a distilled student resumes like any other
        first = distill(teacher, tmp_path / "student", *STUDENT, "--stop_after=30", launcher=launcher)
        assert "stopped after 30 steps at step 30" in first.stdout
        student = distill(teacher, tmp_path / "student", *STUDENT, launcher=launcher)
        assert "resumed from step 30" in student.stdout
    distilled = val_loss(student)
    # Deterministic runs; the margins seen: 2.7158 - 2.6964 at 1 rank, about 0.01 at 2 ranks.
    assert distilled < scratch, (distilled, scratch)
    assert f"distilling from {teacher} (2 layers" in student.stdout
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    # `loss` is the hard next-token loss; the objective mixes it with T^2 KL (alpha 0.5, T 1).
    last = records[-1]
    assert last["distill/kl"] > 0
    assert last["distill/objective"] == pytest.approx(0.5 * last["loss"] + 0.5 * last["distill/kl"], rel=1e-3)
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["distill"]["teacher_dir"] == str(teacher)
    assert saved["distill"]["checkpoint"] == str(teacher / "checkpoints" / "ckpt-00000200")
    if launcher == "gloo":
        assert saved["data"]["data_dir"] == str(data_dir)
        return
    assert saved["data"]["tokenizer_dir"] == str(teacher / "tokenizer")
    # A rerun finds its prepared data as it was and its teacher as it was, and refuses another objective.
    other = distill(teacher, tmp_path / "student", *STUDENT, f"--data_dir={tmp_path / 'data'}",
                    "--distill_temperature=2", check=False)
    assert other.returncode == 1 and other.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'student'} was distilled from --teacher_dir={teacher} with --distill_temperature=1 "
        "--distill_alpha=0.5; rerun with those or use another --model_dir")
    plain = pretrain(tmp_path / "student", *STUDENT, f"--tokenizer_dir={teacher / 'tokenizer'}",
                     data_dir=tmp_path / "data", check=False)
    assert plain.returncode == 1 and "resume it with pipelines.distill" in plain.stderr.strip().splitlines()[-1]


def test_bad_teachers_are_one_line_errors(teacher, tmp_path):
    from tfllm.tokenizers import ByteTokenizer

    no_checkpoints = tmp_path / "untrained"
    no_checkpoints.mkdir()
    shutil.copy(teacher / "config.json", no_checkpoints)
    shutil.copytree(teacher / "tokenizer", no_checkpoints / "tokenizer")
    ByteTokenizer().save(str(tmp_path / "bytes"))
    an_export = tmp_path / "export"
    an_export.mkdir()
    (an_export / "export.json").write_text("{}")
    cases = [
        ([], f"--teacher_dir={an_export} is an export", an_export),
        ([], f"--teacher_dir={no_checkpoints}: no checkpoint to learn from", no_checkpoints),
        ([f"--data_dir={tmp_path / 'byte_data'}", f"--tokenizer_dir={tmp_path / 'bytes'}"],
         "is not the data's (byte, 259 tokens", teacher),
        ([], "no config.json (not a model dir written by pipelines.pretrain)", tmp_path / "bytes"),
        (["--distill_temperature=-1"], "--distill_temperature=-1.0: must be positive", teacher),
        (["--distill_alpha=1.5"], "--distill_alpha=1.5: must be in [0, 1]", teacher),
    ]
    procs = run_many([distill_args(teacher_dir, tmp_path / f"student{i}", *STUDENT, *extra)
                      for i, (extra, _, teacher_dir) in enumerate(cases)], check=False)
    for i, ((extra, message, _), proc) in enumerate(zip(cases, procs)):
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], (extra, proc.stderr[-1500:])
        assert not (tmp_path / f"student{i}").exists()
    assert not (tmp_path / "byte_data").exists()
    before = {p.name: p.stat().st_mtime_ns for p in teacher.rglob("*")}
    proc = distill(teacher, teacher, check=False)
    assert proc.returncode == 1 and "the student needs a model dir of its own" in proc.stderr.splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in teacher.rglob("*")} == before
