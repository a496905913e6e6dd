"""Does pretraining pay off downstream? IMDB-pretrained backbone against the same architecture from
scratch, fine-tuned on SST-2 and on IMDB's own labels, over three fine-tuning seeds.

    python tests/benchmarks/downstream_bench.py --run_dir=runs/downstream     # or: make bench-downstream

Pretrains flags/imdb_pretrain.cfg on IMDB's 50,000 unlabelled reviews (about 55 minutes on 2 cores),
then runs flags/sst2_from_imdb.cfg (SST-2 train -> dev) and flags/imdb_sentiment.cfg (IMDB train
-> test, validated on 10% of train) for --init=pretrained and --init=scratch and each seed. It
prints, per task and init, the mean and range of the accuracy of the checkpoint validation chose
(SST-2: on dev, which also chose it; IMDB: on test) and, for SST-2, of the last step's dev accuracy.
Runs that already finished in --run_dir are reused (delete it to start again).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
TASKS = {"sst2": "--flagfile=flags/sst2_from_imdb.cfg", "imdb": "--flagfile=flags/imdb_sentiment.cfg"}


def _run(name: str, args: list[str], run_dir: pathlib.Path, done: pathlib.Path) -> float:
    if not done.exists():
        print(f"{name}: python -m {' '.join(args)}", flush=True)
        started = time.time()
        with open(run_dir / f"{name}.log", "w") as out:
            subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        (run_dir / f"{name}.seconds").write_text(f"{time.time() - started:.0f}\n")
    return float((run_dir / f"{name}.seconds").read_text())


def _summary(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/downstream")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="sst2,imdb")
    parser.add_argument("--output_json", default="")
    a = parser.parse_args()
    run_dir = pathlib.Path(a.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pretrained = run_dir / "imdb"
    minutes = _run("pretrain", ["pipelines.pretrain", "--flagfile=flags/imdb_pretrain.cfg", f"--model_dir={pretrained}"],
                   run_dir, pretrained / "checkpoints" / "ckpt-00006000") / 60
    print(f"pretraining: {minutes:.1f} min", flush=True)
    results = {"pretrain_minutes": minutes, "runs": {}}
    for task in a.tasks.split(","):
        for init in ("pretrained", "scratch"):
            for seed in a.seeds.split(","):
                name = f"{task}-{init}-seed{seed}"
                report = run_dir / f"{name}.json"
                seconds = _run(name, ["pipelines.finetune", TASKS[task], f"--pretrained_dir={pretrained}",
                                      f"--model_dir={run_dir / name}", f"--init={init}", f"--seed={seed}",
                                      f"--output_json={report}"], run_dir, report)
                result = json.loads(report.read_text())
                results["runs"][name] = {"best_validation": result["best_accuracy"],
                                         "last_validation": result["validation"]["accuracy"],
                                         "test": result.get("test", {}).get("accuracy"), "seconds": seconds}
    print(f"\n{'task':6} {'init':11} {'selected: mean (range), %':28} {'last step: mean (range), %':28} minutes/run")
    for task in a.tasks.split(","):
        for init in ("pretrained", "scratch"):
            runs = [r for n, r in results["runs"].items() if n.startswith(f"{task}-{init}-")]
            selected = [r["test"] if task == "imdb" else r["best_validation"] for r in runs]
            last = [r["last_validation"] for r in runs]
            print(f"{task:6} {init:11} {_summary(selected):28} {_summary(last):28} "
                  f"{sum(r['seconds'] for r in runs) / len(runs) / 60:.1f}")
    if a.output_json:
        pathlib.Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
