"""Loss reached by minift.AdamW8bit vs torch.optim.AdamW (fp32 states) and bitsandbytes' AdamW8bit.

Two CPU problems, same seed, data and steps for every optimizer:
  1. regression: a 2-layer MLP fits a random teacher MLP (mean squared error, full batch);
  2. lm: a tiny minift.model.Llama is first trained with torch AdamW on one synthetic token
     corpus (shared starting point), then fine-tuned on another with each optimizer.
bitsandbytes is an optional oracle: it is reported when installed.

    python examples/optim_quality.py --out optim_quality.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
import torch.nn.functional as F

import minift
from minift.config import ModelConfig
from minift.model import Llama


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


def _pretrained_lm(seed: int, steps: int = 30) -> Llama:
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
    """Fine-tune the shared tiny Llama on a second Markov corpus; returns the loss per step."""
    model = copy.deepcopy(base if base is not None else _pretrained_lm(seed))
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="optim_quality.json", help="JSON file to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # same arithmetic on every machine size
    results = {"torch": torch.__version__, "platform": platform.platform(), "problems": {}}
    base = _pretrained_lm(args.seed)
    problems = {"regression": (lambda mk: regression(mk, seed=args.seed), 3e-3),
                "lm": (lambda mk: lm_finetune(mk, seed=args.seed, base=base), 3e-3)}
    for name, (run, lr) in problems.items():
        row = {}
        for opt_name, make in optimizer_factories(lr, 0.01).items():
            losses = run(make)
            row[opt_name] = {"final_loss": tail_mean(losses), "first_loss": losses[0]}
        ref = row["torch_adamw"]["final_loss"]
        for opt_name, r in row.items():
            r["rel_to_torch"] = r["final_loss"] / ref - 1.0
            print(f"{name:10s} {opt_name:18s} final {r['final_loss']:.5f} "
                  f"({100 * r['rel_to_torch']:+.2f}% vs torch)")
        results["problems"][name] = row
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
