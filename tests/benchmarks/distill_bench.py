"""Distillation on tiny Shakespeare: a 6-layer teacher, and its 2-layer student distilled against the same
student trained from scratch, at equal steps and seed, on the teacher's prepared data.

    python tests/benchmarks/distill_bench.py --run_dir=runs/distill     # or: make bench-distill

Every run is flags/shakespeare_char.cfg (2,000 steps, validation over the whole split) with
--num_layers changed; the students differ only in the teacher. It prints each run's final
validation loss and throughput, and the student's gain over scratch (about 6 minutes on 2 cores).
Runs that already finished in --run_dir are reused (delete it to start again).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGFILE = "--flagfile=flags/shakespeare_char.cfg"


def train(name: str, args: list[str], run_dir: pathlib.Path) -> dict:
    log = run_dir / f"{name}.log"
    if not (log.exists() and "val_loss=" in log.read_text()):
        print(f"{name}: {' '.join(args)}", flush=True)
        with open(log, "w") as out:
            subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    text = log.read_text()
    return {"val_loss": float(re.findall(r"^val_loss=([0-9.]+)$", text, re.M)[-1]),
            "tokens_per_sec": float(re.findall(r"^tokens_per_sec=([0-9.]+)$", text, re.M)[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/distill")
    parser.add_argument("--teacher_layers", type=int, default=6)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--output_json", default="")
    a = parser.parse_args()
    run_dir = pathlib.Path(a.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Each run's name carries what sets it apart, so that a reused run is the one asked for.
    teacher = run_dir / f"teacher-{a.teacher_layers}l"
    scratch = f"scratch-{a.student_layers}l"
    distilled = f"student-{a.student_layers}l-from-{a.teacher_layers}l-T{a.temperature:g}-a{a.alpha:g}"
    student = [FLAGFILE, f"--num_layers={a.student_layers}"]
    results = {
        "teacher": train(teacher.name, ["pipelines.pretrain", FLAGFILE, f"--num_layers={a.teacher_layers}",
                                        f"--model_dir={teacher}"], run_dir),
        "scratch": train(scratch, ["pipelines.pretrain", *student, f"--model_dir={run_dir / scratch}",
                                   f"--data_dir={teacher / 'data'}"], run_dir),
        "student": train(distilled, ["pipelines.distill", *student, f"--model_dir={run_dir / distilled}",
                                     f"--teacher_dir={teacher}", f"--distill_temperature={a.temperature}",
                                     f"--distill_alpha={a.alpha}"], run_dir),
    }
    rows = [("teacher", a.teacher_layers), ("scratch", a.student_layers), ("student", a.student_layers)]
    print(f"\n{'run':<9}{'layers':>7}{'val loss':>10}{'tokens/s':>10}")
    for name, layers in rows:
        r = results[name]
        print(f"{name:<9}{layers:>7}{r['val_loss']:>10.4f}{r['tokens_per_sec']:>10,.0f}")
    gain = results["scratch"]["val_loss"] - results["student"]["val_loss"]
    print(f"distilled (T={a.temperature:g}, alpha={a.alpha:g}): validation loss {abs(gain):.4f} "
          f"{'lower' if gain > 0 else 'higher'} than the same student from scratch")
    if a.output_json:
        pathlib.Path(a.output_json).write_text(json.dumps({**results, "gain": gain, "temperature": a.temperature,
                                                           "alpha": a.alpha}, indent=2))


if __name__ == "__main__":
    main()
