"""What `minift.train` adds to a training step on the CPU: its steps against a hand-written loop
over the same model, LoRA and QLoRA, on a SmolLM2-135M-shaped Llama (random weights: speed does
not depend on their values), batch 8 x 64.

The hand loop does what the training step does and nothing else: forward, the chunked loss,
backward, gradient clipping, torch AdamW. `minift.train`'s first step runs under the memory
tracker and is reported apart. The two sides alternate, round by round, on one machine.

    python examples/step_overhead.py --out docs/benchmarks/step_overhead_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import minift
from minift.bench.runinfo import git_commit, machine_info
from minift.files import write_json
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.objectives.loss import model_loss_sum

# SmolLM2-135M's architecture (its config.json)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=100000.0, torch_dtype="float32")


def build(method: str):
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMOLLM2_135M))
    if method == "qlora":
        model = minift.quantize_model(model)
    return minift.lora_wrap(model, r=16, alpha=32)


def batches(n: int, batch: int, seq: int) -> list[dict]:
    rows = [[(i * 7 + j) % 49000 + 10 for j in range(seq)] for i in range(n * batch)]
    return [{"input_ids": r, "labels": r} for r in rows]


def train_steps(method: str, data, steps: int, batch: int) -> list[float]:
    """Seconds of each step as `minift.train` times them (its metrics.jsonl)."""
    out = Path(tempfile.mkdtemp())
    config = minift.TrainConfig(method=method, micro_batch_size=batch, max_steps=steps, bf16=False,
                                progress=False, output_dir=str(out), device="cpu", warmup_ratio=0.0)
    minift.train(build(method), data, config)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens"] / x["tokens_per_s"] for x in lines]


def hand_steps(method: str, data, steps: int, batch: int) -> list[float]:
    model = build(method).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for s in range(steps):
        rows = data[s * batch:(s + 1) * batch]
        ids = torch.tensor([r["input_ids"] for r in rows])
        t0 = time.perf_counter()
        loss = model_loss_sum(model, {"input_ids": ids}, ids, 1024) / (ids.shape[0] * (ids.shape[1] - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is reported apart)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    data = batches(args.steps, args.batch, args.seq)
    results = {}
    for method in ("lora", "qlora"):
        runs = {"minift.train": [], "hand loop": []}
        for _ in range(args.rounds):
            runs["minift.train"].append(train_steps(method, data, args.steps, args.batch))
            runs["hand loop"].append(hand_steps(method, data, args.steps, args.batch))
        entry = {}
        for side, times in runs.items():
            later = [t for run in times for t in run[1:]]
            entry[side] = {"first_step_s": [run[0] for run in times], "later_steps_s": later,
                           "median_later_s": statistics.median(later)}
        entry["later_ratio"] = entry["minift.train"]["median_later_s"] / entry["hand loop"]["median_later_s"]
        entry["first_step_ratio"] = (statistics.median(entry["minift.train"]["first_step_s"])
                                     / statistics.median(entry["hand loop"]["first_step_s"]))
        results[method] = entry
        print(f"{method}: minift.train {entry['minift.train']['median_later_s']:.2f} s/step "
              f"(first, tracked: {statistics.median(entry['minift.train']['first_step_s']):.2f} s), "
              f"hand loop {entry['hand loop']['median_later_s']:.2f} s/step; ratio "
              f"{entry['later_ratio']:.2f} (first step {entry['first_step_ratio']:.2f})", flush=True)
    record = {"command": "python examples/step_overhead.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "git_commit": git_commit(), "model": "SmolLM2-135M architecture, random weights",
              "batch": [args.batch, args.seq], "settings": vars(args), "results": results}
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
