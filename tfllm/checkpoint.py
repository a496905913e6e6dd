"""Atomic checkpoints: model + optimizer variables and the training state.

Layout of `<model_dir>/checkpoints/`:
    ckpt-00000100/variables.npz   every model and optimizer variable, in order, by path
    ckpt-00000100/state.json      step, epoch, world size, batch, validation loss, ...
    index.json                    latest checkpoint, best checkpoint by validation loss

A checkpoint is written into a hidden `.tmp-*` directory, fsynced and renamed into place, and
only then named in index.json (also written by rename). A crash at any moment leaves the
previous checkpoint as the latest complete one. Only rank 0 calls `save`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np

from tfllm import atomic

CKPT_DIR = "checkpoints"
INDEX = "index.json"
_NAME = re.compile(r"^ckpt-(\d{8})$")
_AUTO_NUMBER = re.compile(r"_\d+(?=[/_]|$)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this model; the message says why."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keys(variables) -> list[str]:
    return [f"{i:05d}:{v.path}" for i, v in enumerate(variables)]


class CheckpointManager:
    def __init__(self, model_dir: str, keep: int = 3):
        self.dir = os.path.join(model_dir, CKPT_DIR)
        self.keep = max(1, keep)

    # ----------------------------------------------------------------- reading
    def index(self) -> dict:
        try:
            with open(os.path.join(self.dir, INDEX)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def complete(self) -> list[str]:
        """Names of complete checkpoints, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        names = [n for n in os.listdir(self.dir) if _NAME.match(n)
                 and os.path.exists(os.path.join(self.dir, n, "state.json"))]
        return sorted(names)

    def latest(self) -> str | None:
        names = self.complete()
        latest = self.index().get("latest")
        if latest in names:
            return os.path.join(self.dir, latest)
        return os.path.join(self.dir, names[-1]) if names else None

    def best(self) -> dict | None:
        return self.index().get("best")

    def resolve(self, name_or_path: str | None) -> str:
        """A checkpoint directory from None (latest), 'best', a name, a step number or a path."""
        if name_or_path in (None, "", "latest"):
            path = self.latest()
        elif name_or_path == "best":
            best = self.best()
            path = os.path.join(self.dir, best["name"]) if best else None
        elif name_or_path.isdigit():
            path = os.path.join(self.dir, f"ckpt-{int(name_or_path):08d}")
        elif os.path.isdir(name_or_path):
            path = name_or_path
        else:
            path = os.path.join(self.dir, name_or_path)
        if not path or not os.path.exists(os.path.join(path, "state.json")):
            raise CheckpointError(f"{self.dir}: no checkpoint {name_or_path or 'latest'!r} found")
        return path

    @staticmethod
    def read_state(path: str) -> dict:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)

    def restore(self, path: str, variables, model_only: bool = False) -> dict:
        """Loads `variables` (model then optimizer, as saved) from `path`; returns its state.

        With `model_only`, `variables` are the model's alone (the leading entries), as for inference.
        """
        variables = list(variables)
        state = self.read_state(path)
        try:
            with np.load(os.path.join(path, "variables.npz")) as z:
                stored = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable variables.npz ({e})") from None
        if len(stored) != len(variables) and not (model_only and len(stored) > len(variables)):
            raise CheckpointError(f"{path}: holds {len(stored)} variables, this model and optimizer have "
                                  f"{len(variables)} (a checkpoint of another model?)")
        # Variables match by position; their paths must agree up to Keras's automatic numbering
        # ("gpt2_backbone_1" when a second model is built in one process).
        by_index = {int(k.split(":", 1)[0]): (k, v) for k, v in stored.items()}
        values = []
        for i, var in enumerate(variables):
            if i not in by_index:
                raise CheckpointError(f"{path}: no variable #{i} ({var.path}) (a checkpoint of another model?)")
            key, value = by_index[i]
            saved_path = key.split(":", 1)[1]
            if _AUTO_NUMBER.sub("", saved_path) != _AUTO_NUMBER.sub("", var.path):
                raise CheckpointError(f"{path}: variable #{i} is {saved_path!r} in the checkpoint, {var.path!r} in "
                                      "this model (a checkpoint of another model?)")
            if tuple(value.shape) != tuple(var.shape):
                raise CheckpointError(f"{path}: {var.path} has shape {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(var.shape)} in this model")
            values.append(value)
        for var, value in zip(variables, values):
            var.assign(value)
        return state

    # ----------------------------------------------------------------- writing
    def save(self, step: int, variables, state: dict, val_loss: float | None = None) -> str:
        os.makedirs(self.dir, exist_ok=True)
        name = f"ckpt-{step:08d}"
        final = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        variables = list(variables)
        arrays = {k: np.asarray(v.numpy()) for k, v in zip(_keys(variables), variables)}
        with open(os.path.join(tmp, "variables.npz"), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        atomic.write_json(os.path.join(tmp, "state.json"), {**state, "step": step, "val_loss": val_loss,
                                                      "saved_at": time.time()})
        if os.path.exists(final):  # re-saving a step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.dir)

        index = self.index()
        index["latest"] = name
        best = index.get("best")
        if val_loss is not None and np.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
            index["best"] = {"name": name, "step": step, "val_loss": float(val_loss)}
        atomic.write_json(os.path.join(self.dir, INDEX), index)
        self._prune(index)
        return final

    def _prune(self, index: dict) -> None:
        names = self.complete()
        protected = set(names[-self.keep:]) | {index.get("latest")}
        if index.get("best"):
            protected.add(index["best"]["name"])
        for n in names:
            if n not in protected:
                shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)
        for n in os.listdir(self.dir):  # leftovers of a save that was killed (saves are synchronous)
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)
