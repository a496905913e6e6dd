"""Reference throughput: a PyTorch GPT of nanoGPT's architecture and training loop (CPU).

Not part of tfllm and not a test: it gives the "nanoGPT tokens/s on this machine" figure the
Shakespeare benchmark is compared with. Architecture as nanoGPT's model (pre-LayerNorm blocks
without biases, causal attention via scaled_dot_product_attention, 4x GELU MLP, tied
embeddings, N(0, 0.02) init with 0.02/sqrt(2L) residual projections); loop as its train.py
on CPU (random windows, AdamW betas (0.9, 0.99), weight decay on 2-D weights, clip 1.0, no
torch.compile). Run with a venv that has torch:
    python tests/benchmarks/torch_reference.py ../shared/data/tinyshakespeare.txt --steps 300
    python tests/benchmarks/torch_reference.py ../shared/data/tinyshakespeare.txt --steps 2000 --schedule --eval
(the second is nanoGPT's full 2000-step run, scored like tfllm: every validation character once)
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


def lr_at(step, a):
    """nanoGPT's get_lr: linear warmup, then cosine from lr to min_lr over the run."""
    if step < a.lr_warmup:
        return a.lr * (step + 1) / (a.lr_warmup + 1)
    ratio = min(1.0, (step - a.lr_warmup) / max(1, a.steps - a.lr_warmup))
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


@torch.no_grad()
def full_split_loss(model, data, ctx):
    """Mean loss over every token of the split: windows of ctx + 1 overlapping by one, as tfllm's."""
    model.eval()
    n = (len(data) - 1) // ctx
    windows = np.stack([data[i * ctx: i * ctx + ctx + 1] for i in range(n)])
    total = 0.0
    for start in range(0, n, 64):
        w = torch.from_numpy(windows[start:start + 64])
        total += float(model(w[:, :-1].contiguous(), w[:, 1:].contiguous())) * len(w)
    model.train()
    return total / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--schedule", action="store_true", help="nanoGPT's warmup + cosine schedule over --steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr", type=float, default=1e-4)
    p.add_argument("--lr_warmup", type=int, default=100)
    p.add_argument("--eval", action="store_true", help="report the loss over the whole validation split")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    text = open(a.corpus, encoding="utf-8").read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], np.int64)
    cut = int(0.9 * len(text))
    data, val = ids[:cut], ids[cut:]
    torch.manual_seed(a.seed)
    model = GPT(len(chars), a.ctx, 4, 4, 128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(a.seed)
    step_times, loop_times = [], []
    total = a.steps if a.schedule else a.warmup + a.steps
    for step in range(total):
        started = time.perf_counter()
        if a.schedule:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, a)
        ix = rng.integers(0, len(data) - a.ctx - 1, a.batch)
        x = torch.from_numpy(np.stack([data[i:i + a.ctx] for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + a.ctx] for i in ix]))
        t = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()  # nanoGPT reads the loss every iteration too
        now = time.perf_counter()
        if step >= a.warmup:
            step_times.append(now - t)
            loop_times.append(now - started)
    step_med, loop_mean = float(np.median(step_times)), float(np.mean(loop_times))
    print(f"torch_threads={torch.get_num_threads()} step_ms={1000 * step_med:.2f} "
          f"tokens_per_sec={a.batch * a.ctx / step_med:.1f} loop_tokens_per_sec={a.batch * a.ctx / loop_mean:.1f} "
          f"params={sum(p.numel() for p in model.parameters())} train_loss={loss_value:.4f}")
    if a.eval:
        print(f"val_loss={full_split_loss(model, val, a.ctx):.4f}")


if __name__ == "__main__":
    main()
