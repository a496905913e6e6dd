"""Loss and perplexity of a checkpoint, exactly token-weighted across ranks.

Single process:
    python -m pipelines.evaluate --model_dir=runs/tiny                       # validation split of its data
    python -m pipelines.evaluate --model_dir=runs/tiny --split=train --checkpoint=best
    python -m pipelines.evaluate --model_dir=runs/tiny --text_file=notes.txt  # raw text, model's tokenizer
    python -m pipelines.evaluate --model_dir=runs/imdb-sst2 --text_file=../shared/data/sst2/dev.tsv \
        --text_field=content --output_json=/tmp/sst2-dev-lm.json
Distributed (same numbers at any world size):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.evaluate --model_dir=runs/tiny
    mpirun -np 2 python -m pipelines.evaluate --model_dir=runs/tiny
Results: stdout (`loss=`, `perplexity=`, `tokens=`), a JSON file (--output_json, default
<model_dir>/eval/<split>-step<N>.json) and TensorBoard scalars in <model_dir>/tb/eval/<split>.
An export dir (pipelines.export, quantized or not) is evaluated as it serves; nothing is written
into it, so --output_json is required:
    python -m pipelines.evaluate --model_dir=exports/tiny-int8 --output_json=/tmp/int8.json
"""

import dataclasses
import os
import re

from absl import flags

from tfllm import atomic, cli, distributed
from tfllm.config import ConfigError
from tfllm.data.corpus import CorpusError
from tfllm.data.pipeline import WindowDataset
from tfllm.evaluate import TextWindows, evaluate
from tfllm.restore import is_export, load_trained_model
from tfllm.summary import SummaryWriter

flags.DEFINE_string("model_dir", "", "Model dir written by pipelines.pretrain, or an export of one.")
flags.DEFINE_string("checkpoint", "latest", "latest, best, a step number or a checkpoint directory.")
flags.DEFINE_string("data_dir", "", "Prepared data to evaluate on (default: the model's own data).")
flags.DEFINE_enum("split", "validation", ["train", "validation"], "Split of the prepared data.")
flags.DEFINE_string("text_file", "", "Evaluate on this raw text file instead, tokenized with the model's tokenizer.")
flags.DEFINE_string("text_field", "", "The --text_file's text field (.jsonl) or column (.tsv, .parquet); "
                    "default: the one the model's own data was read with. Cleaning is always the model's.")
flags.DEFINE_integer("eval_batch_size", 16, "Windows per rank per batch.")
flags.DEFINE_integer("max_batches", 0, "Batches per rank (0: all).")
flags.DEFINE_string("output_json", "", "Where to write the results (default <model_dir>/eval/<split>-step<N>.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output_json.")
FLAGS = flags.FLAGS


def main(argv):
    world = distributed.init()
    export_dir = is_export(FLAGS.model_dir)
    if export_dir and not FLAGS.output_json:  # an export is a finished artifact: nothing is written into it
        raise ConfigError(f"{FLAGS.model_dir} is an export: pass --output_json=FILE for the results")
    if FLAGS.text_field and not FLAGS.text_file:
        raise ConfigError("--text_field names the text of a --text_file: pass --text_file too")
    if "\t" in FLAGS.text_field:
        raise ConfigError(f"--text_field={FLAGS.text_field!r}: a field or column name has no tab")
    trained = load_trained_model(FLAGS.model_dir, FLAGS.checkpoint)
    seq_len = trained.config.data.seq_len
    if FLAGS.text_file:
        data = trained.config.data
        if FLAGS.text_field:
            data = dataclasses.replace(data, jsonl_field=FLAGS.text_field, parquet_column=FLAGS.text_field,
                                       tsv_column=FLAGS.text_field)
        try:
            dataset, name = TextWindows(FLAGS.text_file, trained.tokenizer, seq_len, data), "text"
        except CorpusError as e:  # its hint names preparation's flags; here --text_field serves every format
            raise CorpusError(re.sub(r"--(jsonl_field|tsv_column|parquet_column)\b", "--text_field", str(e))) from None
    else:
        data_dir = FLAGS.data_dir or trained.config.data.data_dir
        dataset, name = WindowDataset(data_dir, FLAGS.split), FLAGS.split
        if dataset.vocab_size != trained.config.model.vocab_size:
            raise ConfigError(f"{data_dir} has a {dataset.vocab_size}-token vocabulary, the model "
                              f"{trained.config.model.vocab_size}")
    out = FLAGS.output_json or os.path.join(FLAGS.model_dir, "eval", f"{name}-step{trained.step}.json")
    if world.is_chief and os.path.exists(out) and not FLAGS.overwrite:
        raise ConfigError(f"{out}: exists (pass --overwrite to replace it)")
    result = evaluate(trained.model, dataset, FLAGS.eval_batch_size, FLAGS.max_batches)
    result.update(step=trained.step, checkpoint=trained.checkpoint, source=dataset.data_dir, split=name,
                  world_size=world.size)
    if world.is_chief:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic.write_json(out, result, sort_keys=False)
        if not export_dir:
            writer = SummaryWriter(os.path.join(FLAGS.model_dir, "tb", "eval"), enabled=True)
            writer.scalars(name, trained.step, {"loss": result["loss"], "perplexity": result["perplexity"]})
            writer.close()
        print(f"loss={result['loss']:.6f}\nperplexity={result['perplexity']:.4f}\ntokens={result['tokens']}\n"
              f"results: {out}", flush=True)


if __name__ == "__main__":
    cli.run(main)
