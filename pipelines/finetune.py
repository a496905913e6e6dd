r"""Fine-tunes a pretrained tfllm model dir into a text classifier; evaluates, predicts, exports.

Train (rerun to resume; --init=scratch trains the same architecture from random weights):
    python -m pipelines.finetune --flagfile=flags/sst2.cfg --pretrained_dir=runs/demo/model --model_dir=runs/sst2
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.finetune --flagfile=flags/sst2.cfg \
        --pretrained_dir=runs/demo/model --model_dir=runs/sst2
    mpirun -np 2 python -m pipelines.finetune --flagfile=flags/sst2.cfg --pretrained_dir=... --model_dir=...
Evaluate (accuracy, per-class precision/recall/F1, confusion matrix; same figures at any rank count):
    python -m pipelines.finetune --mode=evaluate --model_dir=runs/sst2 --eval_file=../shared/data/sst2/dev.tsv
Predict (one text per line from a file or stdin; prints label<TAB>probability per line):
    echo "a gorgeous , witty film" | python -m pipelines.finetune --mode=predict --model_dir=runs/sst2
Export (SavedModel, signature `classify`: strings in, probabilities and labels out; --quantize=int8 or
int4 for quantized weights, as pipelines.export). An export evaluates and predicts like the model dir:
    python -m pipelines.finetune --mode=export --model_dir=runs/sst2 --export_dir=runs/sst2-int8 --quantize=int8
    python -m pipelines.finetune --mode=evaluate --model_dir=runs/sst2-int8 --eval_file=../shared/data/sst2/dev.tsv
"""

import dataclasses
import json
import os
import sys

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.flags import (Options, define_finetune_flags, define_options, define_train_flags, finetune_config_from_flags,
                         option, read_options, shared)
from tfllm.quantize import check_mode, weight_bytes


@dataclasses.dataclass(frozen=True)
class FinetuneOptions(Options):
    mode: str = option("train", "What to do.", choices=("train", "evaluate", "predict", "export"))
    checkpoint: str = option("best", "evaluate/predict/export: best, latest, a step or a path.")
    eval_file: str = option("", "evaluate: labelled file (default: the run's validation examples).")
    input: str = option("-", "predict: text file, one example per line ('-': stdin).")
    export_dir: str = option("", "export: output directory.")
    quantize: str = option("", "export: int8 or int4, quantized weights (as pipelines.export --quantize).")
    output_json: str = option("", "train/evaluate: also write the final report here.")
    model_dir: str = shared()
    overwrite: bool = shared()
    init_preset: str = shared()


define_train_flags()
define_finetune_flags()
define_options(FinetuneOptions)


def _read_texts(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--input={path}: cannot read it ({e})") from None
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"--input={path}: no texts")
    return texts


def main(argv):
    from tfllm import finetune

    opts = read_options(FinetuneOptions)
    if opts.init_preset:  # a pretraining flag that fine-tuning would otherwise silently ignore
        raise ConfigError("--init_preset starts pretraining runs; fine-tuning starts from --pretrained_dir")
    if opts.quantize and opts.mode != "export":
        raise ConfigError("--quantize applies to --mode=export")
    if opts.mode == "train":
        result = finetune.finetune(finetune_config_from_flags())
    else:
        if not opts.model_dir:
            raise ConfigError("--model_dir is required")
        distributed.init()
        if opts.mode == "export":
            if not opts.export_dir:
                raise ConfigError("--export_dir is required")
            if os.path.abspath(opts.export_dir) == os.path.abspath(opts.model_dir):
                raise ConfigError(f"--export_dir={opts.export_dir} is the --model_dir it exports from; choose another")
            if opts.quantize:
                check_mode(opts.quantize)
        clf = finetune.load_classifier(opts.model_dir, opts.checkpoint)
        if opts.mode == "predict":
            for label, prob in finetune.predict(clf, _read_texts(opts.input)):
                print(f"{label}\t{prob:.4f}")
            return
        if opts.mode == "export":
            size = weight_bytes(clf.model)
            out = finetune.export_classifier(clf, opts.export_dir, opts.overwrite, opts.quantize, opts.model_dir)
            if opts.quantize:
                print(f"quantized to {opts.quantize}: weights {size / 1e6:.2f} MB -> "
                      f"{weight_bytes(clf.model) / 1e6:.2f} MB")
            print(f"exported {out}")
            return
        result = finetune.evaluate_file(clf, opts.eval_file)
        if distributed.world().is_chief:
            from tfllm.classifier import format_report
            print(format_report(result, clf.classes))
    if distributed.world().is_chief:
        report = result.get("validation", result)
        print(f"accuracy={report['accuracy']:.4f}")
        print(json.dumps(result), flush=True)
        if opts.output_json:
            from tfllm.atomic import write_json
            write_json(opts.output_json, result, sort_keys=False)


if __name__ == "__main__":
    cli.run(main)
