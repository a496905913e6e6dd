r"""Pretrain a GPT-style model with Horovod data parallelism; rerun the same command to resume.

Single process:
    python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=runs/tiny
Two processes on this machine (Gloo, or MPI):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=runs/tiny
    mpirun -np 2 python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=runs/tiny
Many GPU nodes (one process per GPU; the MPIJob in k8s/ runs exactly this):
    horovodrun -np 16 -H node1:8,node2:8 python -m pipelines.pretrain --flagfile=flags/gpt2_124m.cfg \
        --model_dir=/shared/runs/gpt2
Elastic: workers may fail, leave and join (README, "Elastic training"):
    horovodrun -np 3 --min-np 2 --max-np 4 --host-discovery-script ./discover_hosts.sh --slots-per-host 1 \
        python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=/shared/runs/tiny --elastic
Continue from an exported keras-hub preset (its architecture, weights and tokenizer):
    python -m pipelines.pretrain --flagfile=flags/tiny.cfg --init_preset=exports/tiny/preset --model_dir=runs/more
Data is prepared into --data_dir (default <model_dir>/data) on first use. TensorBoard logs go to
<model_dir>/tb. SIGTERM saves a checkpoint and exits 143; the next run resumes from it (with --elastic, a signalled
worker leaves and the others go on). The last
lines printed include `val_loss=<float>` and `tokens_per_sec=<float>` (the whole run, its first
10 steps, which compile the step, left out; validations and checkpoints are not counted).
"""

from tfllm import cli, distributed
from tfllm.flags import config_from_flags, define_train_flags
from tfllm.train import pretrain

define_train_flags()


def main(argv):
    report(pretrain(config_from_flags()))


def report(result: dict) -> None:
    """The lines scripts read (rank 0)."""
    if distributed.world().is_chief:
        val = result["val_loss"]
        print(f"val_loss={val:.4f}" if val is not None else "val_loss=nan")
        print(f"tokens_per_sec={result['tokens_per_sec']:.1f}", flush=True)


if __name__ == "__main__":
    cli.run(main)
