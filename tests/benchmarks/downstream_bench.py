"""Does pretraining pay off downstream? IMDB-pretrained backbone against the same architecture from
scratch, fine-tuned on SST-2 and on IMDB's own labels, over three fine-tuning seeds.

    python tests/benchmarks/downstream_bench.py --run_dir=runs/downstream     # or: make bench-downstream

Pretrains flags/imdb_pretrain.cfg on IMDB's 50,000 unlabelled reviews (about 46 minutes on 2 cores).
For SST-2 the backbone then pretrains further on the text of SST-2's training phrases
(flags/sst2_lm.cfg, from its export; about 5 minutes; --task_lm= skips it). Then it runs
flags/sst2_from_imdb.cfg (SST-2 train -> dev) and flags/imdb_sentiment.cfg (IMDB train -> test,
validated on 10% of train) for --init=pretrained and --init=scratch and each seed. It
prints, per task and init, the mean and range of the accuracy of the checkpoint validation chose
(SST-2: on dev, which also chose it; IMDB: on test) and, for SST-2, of the last step's dev accuracy.
Runs that already finished in --run_dir are reused (delete it to start again).

Variants, as the README's "what was tried" ran them: --pretrain_flags, --task_lm_flags and
--finetune_flags are added to every pretraining, task-text pretraining or fine-tuning command
(after the flagfile, so they override it). --pretrained_dir fine-tunes a backbone pretrained before
instead of pretraining one in --run_dir. --inits=pretrained leaves out the runs from scratch: they read
the backbone's config and tokenizer but not its weights, so a variant of the pretraining alone (one that
keeps the tokenizer, the architecture and the cleaning) would only repeat an earlier run's:

    python tests/benchmarks/downstream_bench.py --run_dir=runs/aux --pretrained_dir=runs/downstream/imdb \
        --tasks=sst2 --finetune_flags="--lm_loss_weight=0.5"
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
TASKS = {"sst2": "--flagfile=flags/sst2_from_imdb.cfg", "imdb": "--flagfile=flags/imdb_sentiment.cfg"}
INITS = ("pretrained", "scratch")
TASK_LM = {"sst2": "--flagfile=flags/sst2_lm.cfg"}  # pretraining further on the task's training text


def _check(name: str, args: list[str], run_dir: pathlib.Path) -> str:
    """The command line of a run; a finished run of another command in run_dir is an error."""
    command = " ".join(shlex.quote(a) for a in args)
    recorded = run_dir / f"{name}.cmd"
    if (run_dir / f"{name}.seconds").exists() and recorded.exists() and recorded.read_text().strip() != command:
        raise SystemExit(f"error: {run_dir} holds a {name} run of another command ({recorded}); "
                         f"use another --run_dir for this variant")
    return command


def _run(name: str, args: list[str], run_dir: pathlib.Path) -> float:
    """Runs `python -m args` once per run dir: a finished run (its .seconds file) is reused, if the
    command it ran (its .cmd file) was this one."""
    command = _check(name, args, run_dir)
    seconds, recorded = run_dir / f"{name}.seconds", run_dir / f"{name}.cmd"
    if seconds.exists():
        return float(seconds.read_text())
    print(f"{name}: python -m {command}", flush=True)
    recorded.write_text(command + "\n")
    started = time.time()
    log = run_dir / f"{name}.log"
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).returncode
    if code:
        lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
        errors = [line[len("error: "):] for line in lines if line.startswith("error:")]
        detail = (errors or lines or ["no output"])[-1]
        raise SystemExit(f"error: {name} exited with {code}: {detail} (log: {log})")
    seconds.write_text(f"{time.time() - started:.0f}\n")
    return float(seconds.read_text())


def _summary(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/downstream")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="sst2,imdb")
    parser.add_argument("--output_json", default="")
    parser.add_argument("--pretrained_dir", default="", help="a backbone pretrained before (default: pretrain one)")
    parser.add_argument("--pretrain_flags", default="", help="added to the pretraining command")
    parser.add_argument("--finetune_flags", default="", help="added to every fine-tuning command")
    parser.add_argument("--task_lm", default="sst2",
                        help="tasks whose pretrained runs start from the backbone pretrained further on the task's "
                             f"training text (of {','.join(TASK_LM)}; empty: none)")
    parser.add_argument("--task_lm_flags", default="", help="added to those task-text pretraining commands")
    parser.add_argument("--inits", default="pretrained,scratch",
                        help="which inits to fine-tune: a run from scratch reads the backbone's config and tokenizer, "
                             "not its weights, so a variant of the pretraining alone can leave it out")
    a = parser.parse_args()
    run_dir = pathlib.Path(a.run_dir).resolve()
    try:
        pretrain_flags, finetune_flags = shlex.split(a.pretrain_flags), shlex.split(a.finetune_flags)
        task_lm_flags = shlex.split(a.task_lm_flags)
    except ValueError as e:
        raise SystemExit(f"error: --pretrain_flags/--finetune_flags/--task_lm_flags: {e}") from None
    task_lm = [t for t in a.task_lm.split(",") if t]
    if any(t not in TASK_LM for t in task_lm):
        raise SystemExit(f"error: --task_lm={a.task_lm}: choose from {','.join(TASK_LM)}, or leave it empty")
    inits = list(dict.fromkeys(i for i in a.inits.split(",") if i))
    if not inits or any(i not in INITS for i in inits):
        raise SystemExit(f"error: --inits={a.inits}: choose from {','.join(INITS)}")
    unknown = [t for t in a.tasks.split(",") if t not in TASKS]
    if unknown or (a.pretrained_dir and a.pretrain_flags):
        raise SystemExit(f"error: unknown --tasks {','.join(unknown)} (choose from {','.join(TASKS)})" if unknown else
                         "error: --pretrain_flags apply to a pretraining run, and --pretrained_dir skips it")
    if a.pretrained_dir and not (pathlib.Path(a.pretrained_dir) / "config.json").exists():
        raise SystemExit(f"error: --pretrained_dir={a.pretrained_dir}: no pretraining model dir (config.json) there")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"runs": {}}
    pretrained = pathlib.Path(a.pretrained_dir).resolve() if a.pretrained_dir else run_dir / "imdb"
    export = run_dir / "export"
    stages = {"pretrain": ["pipelines.pretrain", "--flagfile=flags/imdb_pretrain.cfg", f"--model_dir={pretrained}",
                           *pretrain_flags]} if not a.pretrained_dir else {}
    backbones, finetunes = {}, {}
    for task in a.tasks.split(","):
        if task in task_lm and "pretrained" in inits:
            stages["export"] = ["pipelines.export", f"--model_dir={pretrained}", f"--output_dir={export}", "--overwrite"]
            backbones[task] = run_dir / f"{task}-lm"
            stages[f"{task}-lm"] = ["pipelines.pretrain", TASK_LM[task], f"--init_preset={export / 'preset'}",
                                    f"--model_dir={backbones[task]}", *task_lm_flags]
        for init in inits:
            for seed in a.seeds.split(","):
                name = f"{task}-{init}-seed{seed}"
                backbone = backbones.get(task, pretrained) if init == "pretrained" else pretrained
                finetunes[name] = ["pipelines.finetune", TASKS[task], *finetune_flags, f"--pretrained_dir={backbone}",
                                   f"--model_dir={run_dir / name}", f"--init={init}", f"--seed={seed}",
                                   f"--output_json={run_dir / name}.json"]
    for name, args in {**stages, **finetunes}.items():  # a variant's runs in the wrong run dir stop before any work
        _check(name, args, run_dir)
    results["backbones"] = {task: str(backbones.get(task, pretrained)) for task in a.tasks.split(",")}
    if a.pretrained_dir:
        print(f"pretrained backbone: {pretrained}", flush=True)
    for name, args in stages.items():
        minutes = _run(name, args, run_dir) / 60
        print(f"{name}: {minutes:.1f} min", flush=True)
        results[f"{name}_minutes"] = minutes
    for name, args in finetunes.items():
        seconds = _run(name, args, run_dir)
        result = json.loads((run_dir / f"{name}.json").read_text())
        results["runs"][name] = {"best_validation": result["best_accuracy"],
                                 "last_validation": result["validation"]["accuracy"],
                                 "test": result.get("test", {}).get("accuracy"), "seconds": seconds}
    for task, backbone in results["backbones"].items():
        print(f"{task}: the pretrained runs fine-tune {backbone}")
    print(f"\n{'task':6} {'init':11} {'selected: mean (range), %':28} {'last step: mean (range), %':28} minutes/run")
    for task in a.tasks.split(","):
        for init in inits:
            runs = [r for n, r in results["runs"].items() if n.startswith(f"{task}-{init}-")]
            selected = [r["test"] if task == "imdb" else r["best_validation"] for r in runs]
            last = [r["last_validation"] for r in runs]
            print(f"{task:6} {init:11} {_summary(selected):28} {_summary(last):28} "
                  f"{sum(r['seconds'] for r in runs) / len(runs) / 60:.1f}")
    if a.output_json:
        pathlib.Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
