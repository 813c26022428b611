"""Loss reached by minift.AdamW8bit vs torch.optim.AdamW (fp32 states) and bitsandbytes' AdamW8bit.

Two CPU problems, same seed, data and steps for every optimizer:
  1. regression: a 2-layer MLP fits a random teacher MLP (mean squared error, full batch);
  2. lm: a tiny minift.models.llama.Llama is first trained with torch AdamW on one synthetic token
     corpus (shared starting point), then fine-tuned on another with each optimizer.
bitsandbytes is an optional oracle: it is reported when installed. The JSON result records the
machine (CPU model and vector extensions: AVX2 and AVX-512 kernels sum in different orders, so
the last digits of the losses can differ between CPU types), torch and bitsandbytes versions,
the git commit, the command and every per-step loss. The functions are importable, so the test
suite runs the same problems with fewer steps.

    python examples/optim_quality.py --out docs/benchmarks/optim_quality.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

import minift
from minift.models.config import ModelConfig
from minift.models.llama import Llama


def optimizer_factories(lr: float, weight_decay: float) -> dict:
    """name -> function(params) -> optimizer; same hyper-parameters for all."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    out = {"torch_adamw": lambda ps: torch.optim.AdamW(ps, **kw),
           "minift_adamw8bit": lambda ps: minift.AdamW8bit(ps, **kw)}
    try:
        import bitsandbytes as bnb  # optional oracle

        out["bnb_adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=4096, **kw)
    except ImportError:
        pass
    return out


def regression(make_opt, steps: int = 150, seed: int = 0) -> list[float]:
    """Fit y = teacher(x) + noise with a 64-128-1 MLP (8192-element first layer -> 8-bit states).

    Every step draws a fresh batch of 256 points, so the loss falls towards the noise floor
    (0.01) instead of the model memorising a fixed set.
    """
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(64, 32, generator=g) / 8, torch.randn(32, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))
    opt = make_opt(list(model.parameters()))
    losses = []
    for _ in range(steps):
        x = torch.randn(256, 64, generator=g)
        y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(256, 1, generator=g)  # (256, 1)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _markov_batches(n_batches, vocab, batch, seq, seed):
    """Token sequences from a random sparse Markov chain (learnable structure), (B, T) each."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)  # each token has 4 successors
    out = []
    for _ in range(n_batches):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        rows = [tok]
        for _ in range(seq - 1):
            tok = nxt[tok, torch.randint(0, 4, (batch,), generator=g)]
            rows.append(tok)
        out.append(torch.stack(rows, dim=1))
    return out


def _lm_loss(model, ids):
    logits = model(ids)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def pretrained_lm(seed: int = 0, steps: int = 30) -> Llama:
    """The tiny Llama after `steps` torch-AdamW steps on a first Markov corpus (shared start)."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig.from_name("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for ids in _markov_batches(steps, 256, 8, 32, seed=seed + 100):
        loss = _lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def lm_finetune(make_opt, steps: int = 60, seed: int = 0, base: Llama | None = None) -> list[float]:
    """Fine-tune the shared tiny Llama on a second Markov corpus; returns the loss per step.

    `base` (from `pretrained_lm`) is copied, not changed, so one base serves every optimizer.
    """
    model = copy.deepcopy(base if base is not None else pretrained_lm(seed))
    opt = make_opt(list(model.parameters()))
    losses = []
    for ids in _markov_batches(steps, 256, 8, 32, seed=seed + 200):
        loss = _lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tail_mean(losses, k: int = 10) -> float:
    """Mean of the last k losses (the 'final loss', less noisy than the last step alone)."""
    return sum(losses[-k:]) / len(losses[-k:])


def compare(seed: int = 0, regression_steps: int = 150, lm_steps: int = 60,
            pretrain_steps: int = 30, lr: float = 3e-3, weight_decay: float = 0.01) -> dict:
    """Run both problems with every available optimizer; {problem: {optimizer: result}}."""
    base = pretrained_lm(seed, steps=pretrain_steps)
    problems = {"regression": lambda mk: regression(mk, steps=regression_steps, seed=seed),
                "lm": lambda mk: lm_finetune(mk, steps=lm_steps, seed=seed, base=base)}
    out = {}
    for name, run in problems.items():
        row = {}
        for opt_name, make in optimizer_factories(lr, weight_decay).items():
            losses = run(make)
            row[opt_name] = {"final_loss": tail_mean(losses), "first_loss": losses[0],
                             "losses": losses}
        ref = row["torch_adamw"]["final_loss"]
        for r in row.values():
            r["rel_to_torch"] = r["final_loss"] / ref - 1.0
        out[name] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="optim_quality.json", help="JSON file to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # one thread: the same summation order whatever the machine's core count (the CPU's vector
    # extensions still matter; they are recorded)
    torch.set_num_threads(1)
    settings = dict(seed=args.seed, regression_steps=150, lm_steps=60, pretrain_steps=30,
                    lr=3e-3, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8, torch_threads=1,
                    final_loss="mean of the last 10 steps")
    problems = compare(args.seed, settings["regression_steps"], settings["lm_steps"],
                       settings["pretrain_steps"], settings["lr"], settings["weight_decay"])
    from minift.bench.runinfo import git_commit, git_modified, machine_info

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    # torch's kernel choice can be forced (ATEN_CPU_CAPABILITY=avx2): part of the command
    env = f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} " \
        if os.environ.get("ATEN_CPU_CAPABILITY") else ""
    results = {"command": f"{env}python examples/optim_quality.py {argv_text}".strip(),
               "machine": machine_info(), "torch": torch.__version__,
               "bitsandbytes": bnb_version, "git_commit": git_commit(),
               "git_modified": git_modified(), "settings": settings, "problems": problems}
    for name, row in problems.items():
        for opt_name, r in row.items():
            print(f"{name:10s} {opt_name:18s} first {r['first_loss']:.4f} "
                  f"final {r['final_loss']:.5f} ({100 * r['rel_to_torch']:+.2f}% vs torch)")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
