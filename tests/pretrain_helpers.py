"""Tiny pretraining runs through the real command line, shared by the pretraining tests."""

import json
import pathlib

from conftest import run

TINY = ["-m", "pipelines.pretrain", "--flagfile=flags/tiny.cfg", "--max_corpus_bytes=400000", "--hidden_dim=32",
        "--seq_len=64", "--max_sequence_length=64",
        "--batch_size=8", "--eval_steps=4", "--log_every=1", "--sample_tokens=16", "--shuffle_buffer=256"]


def pretrain(model_dir, *extra, launcher="none", check=True, data_dir=None, **env):
    args = TINY + [f"--model_dir={model_dir}"] + ([f"--data_dir={data_dir}"] if data_dir else []) + list(extra)
    return run(args, launcher=launcher, check=check, **env)


def logged_losses(model_dir) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged twice (crash, then resume) keeps the last."""
    out = {}
    for line in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def event_tags(log_dir) -> dict[str, set]:
    from tensorboard.backend.event_processing import event_accumulator

    tags = {}
    for split in ("train", "validation"):
        acc = event_accumulator.EventAccumulator(str(pathlib.Path(log_dir) / split), size_guidance={"tensors": 0})
        acc.Reload()
        tags[split] = set(acc.Tags()["tensors"])
    return tags
