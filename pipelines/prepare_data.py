r"""Raw text -> tokenizer + TFRecord shards + manifest.json, on every core of every rank.

Single process (--workers threads, by default one per usable core):
    python -m pipelines.prepare_data --corpus=builtin:python-stdlib --data_dir=/tmp/stdlib \
        --tokenizer=sentencepiece_bpe --vocab_size=8000 --seq_len=256
    python -m pipelines.prepare_data --flagfile=flags/shakespeare_char.cfg --data_dir=/tmp/shakespeare

Several ranks (each tokenizes its share of the corpus; rank 0 assembles the same shards that
one process would; --data_dir must be on a filesystem every rank shares):
    horovodrun -np 4 -H node1:2,node2:2 --gloo python -m pipelines.prepare_data --corpus=/data/owt \
        --tokenizer_dir=/data/tok --data_dir=/data/owt-256
    mpirun -np 4 -H node1:2,node2:2 python -m pipelines.prepare_data --corpus=/data/owt \
        --tokenizer_dir=/data/tok --data_dir=/data/owt-256
Pretraining prepares its data on first use the same way, on all of its ranks.
Inputs: files, directories and globs of .txt / .jsonl (--jsonl_field), their .gz / .zst forms, and
.parquet (--parquet_column); named .tsv files with a header line (--tsv_column), such as a
fine-tuning set's training file, whose text a backbone can pretrain further on (--init_preset).
"""

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.data.prepare import prepare
from tfllm.flags import data_config_from_flags, define_data_flags

define_data_flags()


def main(argv):
    cfg = data_config_from_flags()
    if not cfg.data_dir:
        raise ConfigError("--data_dir is required")
    prepare(cfg, cfg.data_dir, world=distributed.init(pin_gpu=False))


if __name__ == "__main__":
    cli.run(main)
