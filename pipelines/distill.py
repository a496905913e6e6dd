r"""Distil a trained model (the teacher) into a smaller one; rerun the same command to resume.

The student trains on the teacher's softened next-token distribution mixed with the data's next
tokens (tfllm/distill.py), with pretraining's step, checkpoints, resume and TensorBoard. Its data
is the teacher's prepared data dir (data flags, e.g. a shared flagfile's, are not used) unless
--data_dir names another, which is then prepared with the teacher's tokenizer. The student is
described by the model and run flags (or a flagfile), as for pipelines.pretrain.

Single process:
    python -m pipelines.distill --teacher_dir=runs/shakespeare --flagfile=flags/shakespeare_char.cfg \
        --num_layers=2 --model_dir=runs/student
Two processes on this machine (Gloo, or MPI):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.distill --teacher_dir=runs/shakespeare \
        --flagfile=flags/shakespeare_char.cfg --num_layers=2 --model_dir=runs/student
    mpirun -np 2 python -m pipelines.distill --teacher_dir=runs/shakespeare --flagfile=flags/shakespeare_char.cfg \
        --num_layers=2 --model_dir=runs/student
The same student from scratch, for comparison at equal steps and seed:
    python -m pipelines.pretrain --flagfile=flags/shakespeare_char.cfg --num_layers=2 --model_dir=runs/scratch \
        --data_dir=runs/shakespeare/data
Every rank reads the teacher dir. TensorBoard shows `loss` (the next-token loss, as any run's) and
`distill/objective`, `distill/kl`. The last lines printed are `val_loss=<float>` and `tokens_per_sec=<float>`.
"""

from pipelines.pretrain import report
from tfllm import cli
from tfllm.flags import define_distill_flags, define_train_flags, distill_config_from_flags
from tfllm.train import pretrain

define_train_flags()
define_distill_flags()


def main(argv):
    report(pretrain(distill_config_from_flags()))


if __name__ == "__main__":
    cli.run(main)
