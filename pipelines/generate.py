r"""Generate text from a trained model dir with its own tokenizer (key/value-cached sampling).

Single process (generation needs no collectives):
    python -m pipelines.generate --model_dir=runs/tiny --prompt="def " --max_new_tokens=200
    python -m pipelines.generate --model_dir=runs/tiny --prompts_file=prompts.txt --strategy=top_p --top_p=0.9 \
        --temperature=0.8 --sampling_seed=1 --checkpoint=best
Under a launcher only rank 0 generates and prints (the others exit at once):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.generate --model_dir=runs/tiny --prompt="def "
    mpirun -np 2 python -m pipelines.generate --model_dir=runs/tiny --prompt="def "
Prompts come from --prompt (repeatable) or --prompts_file (one per line); each continuation is
printed after its prompt, separated by a line of dashes.
"""

import dataclasses

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.flags import (Options, define_options, define_sampling_flags, option, read_options,
                         sampling_config_from_flags, unquote)
from tfllm.generate import generate_text
from tfllm.restore import load_trained_model


@dataclasses.dataclass(frozen=True)
class GenerateOptions(Options):
    model_dir: str = option("", "Model dir written by pipelines.pretrain, or an export of one.")
    checkpoint: str = option("latest", "latest, best, a step number or a checkpoint directory.")
    prompt: list = option([], 'A prompt (repeat the flag for a batch); in a flagfile, "quoted" keeps edge spaces.',
                          repeated=True)
    prompts_file: str = option("", "A file with one prompt per line.")


define_sampling_flags()
define_options(GenerateOptions)


def read_prompts(opts: GenerateOptions) -> list[str]:
    prompts = [unquote(p) for p in opts.prompt]
    if opts.prompts_file:
        try:
            with open(opts.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"--prompts_file={opts.prompts_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file={opts.prompts_file}: invalid UTF-8 at byte {e.start}") from None
    if not prompts:
        raise ConfigError("no prompt: pass --prompt=TEXT or --prompts_file=FILE")
    for i, p in enumerate(prompts, 1):
        if not p:
            raise ConfigError(f"prompt {i} is empty")
    return prompts


def main(argv):
    if not distributed.init(pin_gpu=True).is_chief:
        return
    opts, sampling = read_options(GenerateOptions), sampling_config_from_flags()
    sampling.validate()
    prompts = read_prompts(opts)
    trained = load_trained_model(opts.model_dir, opts.checkpoint)
    outputs = generate_text(trained.model, trained.tokenizer, prompts, sampling, trained.config.data.clean)
    for i, (prompt, text) in enumerate(zip(prompts, outputs)):
        if i:
            print("-" * 40)
        print(prompt + text, flush=True)


if __name__ == "__main__":
    cli.run(main)
