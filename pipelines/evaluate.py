r"""Loss and perplexity of a checkpoint, exactly token-weighted across ranks.

Single process:
    python -m pipelines.evaluate --model_dir=runs/tiny                       # validation split of its data
    python -m pipelines.evaluate --model_dir=runs/tiny --split=train --checkpoint=best
    python -m pipelines.evaluate --model_dir=runs/tiny --text_file=notes.txt  # raw text, model's tokenizer
    python -m pipelines.evaluate --model_dir=runs/imdb-sst2 --text_file=../shared/data/sst2/dev.tsv \
        --text_field=sentence,content --output_json=/tmp/sst2-dev-lm.json
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

from tfllm import atomic, cli, distributed
from tfllm.config import ConfigError
from tfllm.data.corpus import CorpusError
from tfllm.data.formats import listed
from tfllm.data.pipeline import WindowDataset
from tfllm.evaluate import TextWindows, evaluate
from tfllm.flags import Options, define_options, option, read_options
from tfllm.restore import is_export, load_trained_model
from tfllm.summary import SummaryWriter


@dataclasses.dataclass(frozen=True)
class EvaluateOptions(Options):
    model_dir: str = option("", "Model dir written by pipelines.pretrain, or an export of one.")
    checkpoint: str = option("latest", "latest, best, a step number or a checkpoint directory.")
    data_dir: str = option("", "Prepared data to evaluate on (default: the model's own data).")
    split: str = option("validation", "Split of the prepared data.", choices=("train", "validation"))
    text_file: str = option("", "Evaluate on this raw text file instead, tokenized with the model's tokenizer.")
    text_field: str = option("", "The --text_file's text field (.jsonl) or column (.tsv, .parquet), or several "
                             "joined by commas (the first the file has); default: the one the model's own data was "
                             "read with. Cleaning is always the model's.")
    eval_batch_size: int = option(16, "Windows per rank per batch.")
    max_batches: int = option(0, "Batches per rank (0: all).")
    output_json: str = option("", "Where to write the results (default <model_dir>/eval/<split>-step<N>.json).")
    overwrite: bool = option(False, "Replace an existing --output_json.")


define_options(EvaluateOptions)


def main(argv):
    opts = read_options(EvaluateOptions)
    world = distributed.init()
    export_dir = is_export(opts.model_dir)
    if export_dir and not opts.output_json:  # an export is a finished artifact: nothing is written into it
        raise ConfigError(f"{opts.model_dir} is an export: pass --output_json=FILE for the results")
    if opts.text_field and not opts.text_file:
        raise ConfigError("--text_field names the text of a --text_file: pass --text_file too")
    if "\t" in opts.text_field or (opts.text_field and not all(listed(opts.text_field))):
        raise ConfigError(f"--text_field={opts.text_field!r}: a field or column name (no tab), or several joined by commas")
    trained = load_trained_model(opts.model_dir, opts.checkpoint)
    seq_len = trained.config.data.seq_len
    if opts.text_file:
        data = trained.config.data
        if opts.text_field:
            data = dataclasses.replace(data, jsonl_field=opts.text_field, parquet_column=opts.text_field,
                                       tsv_column=opts.text_field)
        try:
            dataset, name = TextWindows(opts.text_file, trained.tokenizer, seq_len, data), "text"
        except CorpusError as e:  # its hint names preparation's flags; here --text_field serves every format
            raise CorpusError(re.sub(r"--(jsonl_field|tsv_column|parquet_column)\b", "--text_field", str(e))) from None
    else:
        data_dir = opts.data_dir or trained.config.data.data_dir
        dataset, name = WindowDataset(data_dir, opts.split), opts.split
        if dataset.vocab_size != trained.config.model.vocab_size:
            raise ConfigError(f"{data_dir} has a {dataset.vocab_size}-token vocabulary, the model "
                              f"{trained.config.model.vocab_size}")
    out = opts.output_json or os.path.join(opts.model_dir, "eval", f"{name}-step{trained.step}.json")
    if world.is_chief and os.path.exists(out) and not opts.overwrite:
        raise ConfigError(f"{out}: exists (pass --overwrite to replace it)")
    result = evaluate(trained.model, dataset, opts.eval_batch_size, opts.max_batches)
    result.update(step=trained.step, checkpoint=trained.checkpoint, source=dataset.data_dir, split=name,
                  world_size=world.size)
    if world.is_chief:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic.write_json(out, result, sort_keys=False)
        if not export_dir:
            writer = SummaryWriter(os.path.join(opts.model_dir, "tb", "eval"), enabled=True)
            writer.scalars(name, trained.step, {"loss": result["loss"], "perplexity": result["perplexity"]})
            writer.close()
        print(f"loss={result['loss']:.6f}\nperplexity={result['perplexity']:.4f}\ntokens={result['tokens']}\n"
              f"results: {out}", flush=True)


if __name__ == "__main__":
    cli.run(main)
