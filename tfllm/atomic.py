"""Atomic filesystem writes: readers see the old content or the new, never a partial one.

Every output tfllm produces (prepared data, checkpoints, exports, config.json) is written
beside its destination and renamed into place, so an interrupted run leaves earlier outputs
intact.
"""

from __future__ import annotations

import json
import os
import shutil


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Moves a fully written `tmp_dir` to `final_dir`, replacing what was there."""
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{os.getpid()}"
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.makedirs(os.path.dirname(final_dir) or ".", exist_ok=True)
        os.rename(tmp_dir, final_dir)


def build_dir(final_dir: str, build) -> str:
    """Calls `build(tmp_dir)` on a fresh temporary directory beside `final_dir`, then moves it into
    place (replacing what was there); on any failure the temporary directory is removed."""
    final_dir = os.path.abspath(final_dir)
    tmp = f"{final_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        build(tmp)
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def copy_dir(src: str, dst: str) -> str:
    """Copies directory `src` to `dst` through `build_dir`: `dst` is whole or absent."""
    return build_dir(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
