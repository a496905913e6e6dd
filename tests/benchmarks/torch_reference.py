"""Reference throughput: a PyTorch GPT of nanoGPT's architecture and training loop (CPU).

Not part of tfllm and not a test: it gives the "nanoGPT tokens/s on this machine" figure the
Shakespeare benchmark is compared with. Architecture as nanoGPT's model (pre-LayerNorm blocks
without biases, causal attention via scaled_dot_product_attention, 4x GELU MLP, tied
embeddings, N(0, 0.02) init with 0.02/sqrt(2L) residual projections); loop as its train.py
on CPU (random windows, AdamW betas (0.9, 0.99), weight decay on 2-D weights, clip 1.0, no
torch.compile). Run with a venv that has torch:
    python tests/benchmarks/torch_reference.py ../shared/data/tinyshakespeare.txt --steps 300
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, d):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--ctx", type=int, default=64)
    a = p.parse_args()
    text = open(a.corpus, encoding="utf-8").read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text[: int(0.9 * len(text))]], np.int64)
    torch.manual_seed(0)
    model = GPT(len(chars), a.ctx, 4, 4, 128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(0)
    times = []
    for step in range(a.warmup + a.steps):
        ix = rng.integers(0, len(data) - a.ctx - 1, a.batch)
        x = torch.from_numpy(np.stack([data[i:i + a.ctx] for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + a.ctx] for i in ix]))
        t = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(f"torch_threads={torch.get_num_threads()} step_ms={1000 * med:.2f} "
          f"tokens_per_sec={a.batch * a.ctx / med:.1f} params={sum(p.numel() for p in model.parameters())}")


if __name__ == "__main__":
    main()
