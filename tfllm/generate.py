"""Text generation with keras-hub's key/value-cached sampling loop.

`CausalLM.generate` seeds a per-layer key/value cache with one pass over the prompt and then
runs one single-token forward pass per new token, instead of re-running the whole sequence.
Prompts of a batch are right-padded; keras-hub's samplers keep each row's own prompt intact.
"""

from __future__ import annotations

import dataclasses

import keras_hub
import numpy as np
import tensorflow as tf

from tfllm.config import ConfigError
from tfllm.data.cleaning import clean_texts
from tfllm.tokenizers import EOD_ID, PAD_ID, Tokenizer

STRATEGIES = ("greedy", "top_k", "top_p", "random")


@dataclasses.dataclass
class SamplingConfig:
    strategy: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 0.9
    seed: int | None = None
    stop_at_eod: bool = True

    def validate(self, flag_prefix: str = "") -> None:
        """`flag_prefix`: how the flags are named where this config came from ('sample_' in pretraining)."""
        f = "--" + flag_prefix
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{f}strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max_new_tokens={self.max_new_tokens}: must be positive")
        if self.temperature <= 0:
            raise ConfigError(f"{f}temperature={self.temperature}: must be positive")
        if self.strategy == "top_k" and self.top_k < 1:
            raise ConfigError(f"{f}top_k={self.top_k}: must be at least 1")
        if self.strategy == "top_p" and not 0 < self.top_p <= 1:
            raise ConfigError(f"{f}top_p={self.top_p}: must be in (0, 1]")

    def describe(self) -> str:
        """'top_k (k=10, temperature 0.8, seed 0)': how a sample was drawn, for its readers."""
        if self.strategy == "greedy":
            return "greedy"
        knob = {"top_k": f"k={self.top_k}, ", "top_p": f"p={self.top_p}, "}.get(self.strategy, "")
        return f"{self.strategy} ({knob}temperature {self.temperature}, seed {self.seed})"


def make_sampler(cfg: SamplingConfig):
    if cfg.strategy == "greedy":
        return keras_hub.samplers.GreedySampler()
    if cfg.strategy == "top_k":
        return keras_hub.samplers.TopKSampler(k=cfg.top_k, seed=cfg.seed, temperature=cfg.temperature)
    if cfg.strategy == "top_p":
        return keras_hub.samplers.TopPSampler(p=cfg.top_p, seed=cfg.seed, temperature=cfg.temperature)
    return keras_hub.samplers.RandomSampler(seed=cfg.seed, temperature=cfg.temperature)


def max_context(model) -> int | None:
    backbone = model.backbone
    return getattr(backbone, "max_sequence_length", None)


def generate_ids(model, prompts: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not included)."""
    cfg.validate()
    if not prompts:
        raise ConfigError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i + 1} is empty after tokenization")
    longest = max(len(p) for p in prompts)
    total = longest + cfg.max_new_tokens
    limit = max_context(model)
    if limit is not None and total > limit:
        raise ConfigError(f"prompt of {longest} tokens + --max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                          f"context of {limit} tokens")
    token_ids = np.full((len(prompts), total), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), total), bool)
    for i, p in enumerate(prompts):
        token_ids[i, : len(p)] = p
        mask[i, : len(p)] = True
    model.compile(sampler=make_sampler(cfg))
    if cfg.seed is not None:
        tf.random.set_seed(cfg.seed)
    out = model.generate({"token_ids": tf.constant(token_ids), "padding_mask": tf.constant(mask)},
                         stop_token_ids=[EOD_ID] if cfg.stop_at_eod else None)
    ids = np.asarray(out["token_ids"])
    results = []
    for i, p in enumerate(prompts):
        new = ids[i, len(p):].tolist()
        if cfg.stop_at_eod and EOD_ID in new:
            new = new[: new.index(EOD_ID)]
        results.append(new[: cfg.max_new_tokens])
    return results


def generate_text(model, tokenizer: Tokenizer, prompts: list[str], cfg: SamplingConfig, clean: str = "none") -> list[str]:
    """Continuations of each prompt (the prompt text is not repeated). Prompts are cleaned as the
    training text was (`clean`, tfllm.data.cleaning; their edge spaces kept): a vocabulary trained
    on lowercased text splits "This" into rare pieces. A continuation follows the cleaned prompt,
    so with html cleaning "a<br>" is continued after "a\n"."""
    for i, text in enumerate(prompts):
        if not text:
            raise ConfigError(f"prompt {i + 1} is empty")
    encoded = [tokenizer.encode(p) for p in clean_texts(prompts, clean, strip=False)]
    return [tokenizer.continuation(p, ids) for p, ids in zip(encoded, generate_ids(model, encoded, cfg))]
