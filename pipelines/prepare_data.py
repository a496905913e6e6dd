"""Raw text -> tokenizer + TFRecord shards + manifest.json.

Single process (preparation is one process; it already uses every core through tf.data):
    python -m pipelines.prepare_data --corpus=builtin:python-stdlib --data_dir=/tmp/stdlib \
        --tokenizer=sentencepiece_bpe --vocab_size=8000 --seq_len=256
    python -m pipelines.prepare_data --flagfile=flags/shakespeare_char.cfg --data_dir=/tmp/shakespeare

Pretraining prepares its data on first use, so under horovodrun / mpirun nothing else is needed:
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=DIR
    mpirun -np 2 python -m pipelines.pretrain --flagfile=flags/tiny.cfg --model_dir=DIR
Inputs: files, directories and globs of .txt / .jsonl (--jsonl_field) and their .gz forms.
"""

from absl import flags

from tfllm import cli
from tfllm.config import ConfigError
from tfllm.data.prepare import prepare
from tfllm.flags import data_config_from_flags, define_data_flags

define_data_flags()
FLAGS = flags.FLAGS


def main(argv):
    cfg = data_config_from_flags()
    if not cfg.data_dir:
        raise ConfigError("--data_dir is required")
    prepare(cfg, cfg.data_dir)


if __name__ == "__main__":
    cli.run(main)
