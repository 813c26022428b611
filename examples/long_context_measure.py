"""Measure shifted sparse attention (S²-Attn) and length-grouped batching.

Four parts, written into one JSON file:

* loss: the shipped base (`examples/base`) LoRA-fine-tuned on rows of 512 tokens (the chats of
  `examples/data/train.jsonl` back to back, every token trained) with full attention and with
  S²-Attn (the default group, a quarter of the row, and a smaller one), the same steps and
  seed; the train loss of the last steps and the held-out loss (`examples/data/eval.jsonl` the
  same way), which is evaluated with full attention as minift always does. Then a tiny Llama
  trained from scratch on counting rows, at two run lengths.
* traced memory: one Llama-3.1-8B LoRA step (gradient checkpointing, batch 1) traced on the
  CUDA path (`minift.estimate_memory`) at several lengths T and groups G, with and without S²-Attn.
* work: the (query, key) pairs the flex kernel computes (every pair of each visited 128 x 128
  block), per head, for S²-Attn and for plain causal attention, at several T and G.
* padding: padding tokens of an epoch of micro-batches with `group_by_length` on and off.

Usage: python examples/long_context_measure.py --out docs/benchmarks/long_context_cpu.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.data.sft import batch_examples, load_dataset
from minift.files import write_json
from minift.models.attention import flex_block_mask
from minift.objectives.sft import evaluate

HERE = Path(__file__).resolve().parent


def rows_of(path, tokenizer, length):
    """The file's tokenized chats back to back, cut into rows of `length` tokens, all trained."""
    examples, _ = load_dataset(path, tokenizer, 4096)
    stream = [t for ex in examples for t in ex["input_ids"]]
    return [{"input_ids": stream[i:i + length], "labels": stream[i:i + length]}
            for i in range(0, len(stream) - length + 1, length)]


def last_losses(out: Path, steps: int) -> float:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(line["loss"] for line in lines[-steps:]) / steps


def loss_part(steps: int, row: int) -> dict:
    tokenizer = minift.load_tokenizer(HERE / "base")
    train_rows = rows_of(HERE / "data" / "train.jsonl", tokenizer, row)
    eval_rows = rows_of(HERE / "data" / "eval.jsonl", tokenizer, row)
    cases = {"full attention": {}, "s2 (G = T/4)": dict(s2_attention=True),
             f"s2 (G = {row // 16})": dict(s2_attention=True, s2_group_size=row // 16)}
    out = {"rows": len(train_rows), "row_tokens": row, "eval_rows": len(eval_rows), "steps": steps,
           "setup": "examples/base, LoRA r 8 alpha 16, lr 3e-3, batch 4, cosine, seed 0", "cases": {}}
    for name, fields in cases.items():
        torch.manual_seed(0)
        model = minift.lora_wrap(minift.load_model(HERE / "base"), r=8, alpha=16)
        with tempfile.TemporaryDirectory() as tmp:
            config = minift.TrainConfig(method="lora", learning_rate=3e-3, micro_batch_size=4,
                                        max_steps=steps, bf16=False, progress=False, output_dir=tmp,
                                        seed=0, device="cpu", **fields)
            before = evaluate(model, eval_rows, config, "cpu")["eval_loss"]
            started = time.perf_counter()
            summary = minift.train(model, train_rows, config)
            seconds = time.perf_counter() - started
            after = evaluate(model, eval_rows, config, "cpu")["eval_loss"]
            out["cases"][name] = {"first_loss": summary["first_loss"],
                                  "train_loss_last_10": last_losses(Path(tmp), 10),
                                  "eval_loss_before": before, "eval_loss_after": after,
                                  "train_seconds": round(seconds, 1)}
    full = out["cases"]["full attention"]
    for case in out["cases"].values():
        for key in ("train_loss_last_10", "eval_loss_after"):
            case[f"{key}_vs_full"] = round(case[key] / full[key] - 1, 4)
    return out


def scratch_part(step_counts=(40, 80)) -> dict:
    """A 2-layer Llama (hidden 32, 4 heads over 2 KV heads) trained from random weights on rows of
    64 counting tokens (tests/test_s2_attention.py's case)."""
    from minift.models.config import ModelConfig
    from minift.models.llama import Llama

    rng = random.Random(3)
    data = []
    for _ in range(32):
        start, period = rng.randrange(64), rng.randint(5, 12)
        ids = ([(start + i) % 64 for i in range(period)] * 8)[:64]
        data.append({"input_ids": ids, "labels": ids})
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         torch_dtype="float32")
    torch.manual_seed(0)
    start = Llama(config).state_dict()
    out = {"rows": len(data), "row_tokens": 64, "setup": "full fine-tuning, lr 1e-2, batch 4, "
           "no warm-up, cosine, seed 0", "cases": {}}
    for steps in step_counts:
        for name, fields in (("full attention", {}), ("s2 (G = 16)", dict(s2_attention=True))):
            model = Llama(config)
            model.load_state_dict(start)
            with tempfile.TemporaryDirectory() as tmp:
                minift.train(model, data, minift.TrainConfig(
                    method="full", learning_rate=1e-2, warmup_ratio=0.0, micro_batch_size=4,
                    max_steps=steps, bf16=False, progress=False, output_dir=tmp, seed=0,
                    device="cpu", **fields))
                out["cases"][f"{steps} steps, {name}"] = {"train_loss_last_10": last_losses(Path(tmp), 10)}
    return out


def trace_part(lengths=(8192, 32768, 131072)) -> list:
    rows = []
    for t in lengths:
        for group in (None, *sorted({2048, t // 4})):
            fields = {} if group is None else dict(s2_attention=True, s2_group_size=group)
            started = time.perf_counter()
            est = minift.estimate_memory("llama-3.1-8b", "lora", 1, t, gradient_checkpointing=True,
                                         attention_mask=False, device="cuda", **fields)
            rows.append({"seq_len": t, "s2_group_size": group, "activations": est.activations,
                         "total": est.total, "reserved": est.reserved,
                         "trace_seconds": round(time.perf_counter() - started, 1)})
    for row in rows:  # what S²-Attn adds over full attention (flash, no mask) at the same length
        full = next(r for r in rows if r["seq_len"] == row["seq_len"] and r["s2_group_size"] is None)
        row["activations_over_full_attention"] = row["activations"] - full["activations"]
        row["total_over_full_attention"] = row["total"] - full["total"]
    return rows


def work_part(lengths=(8192, 16384, 32768, 65536), groups=(1024, 4096)) -> list:
    rows = []
    for t in lengths:
        causal = flex_block_mask(1, t, device="cpu")
        entry = {"seq_len": t, "causal_pairs_per_head":
                 int((causal.kv_num_blocks + causal.full_kv_num_blocks).sum()) * 128 * 128}
        for group in sorted({*groups, t // 4}):
            block = flex_block_mask(1, t, device="cpu", s2_group=group, heads=2)  # one of each half
            pairs = int((block.kv_num_blocks + block.full_kv_num_blocks).sum()) * 128 * 128 // 2
            entry[f"s2_pairs_per_head_G{group}"] = pairs
        rows.append(entry)
    return rows


def padding_part() -> dict:
    out = {}
    rng = random.Random(0)
    sets = {"uniform 16..512 (docs/data.md)": [rng.randint(16, 512) for _ in range(2000)],
            "90% 8..64, 10% 200..500": [rng.randint(200, 500) if rng.random() < 0.1 else
                                        rng.randint(8, 64) for _ in range(2000)]}
    for name, lengths in sets.items():
        examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
        entry = {"examples": len(lengths), "real_tokens": sum(lengths), "micro_batch_size": 8}
        for by_length in (True, False):
            batches = batch_examples(examples, 8, pad_id=0, seed=0, by_length=by_length)
            slots = sum(b["attention_mask"].numel() for b in batches)
            key = "group_by_length" if by_length else "random"
            entry[f"{key}_padding_tokens"] = slots - sum(lengths)
            entry[f"{key}_padding_efficiency"] = round(sum(lengths) / slots, 4)
        out[name] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="long_context_cpu.json")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each loss run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    for name, part in (("padding", padding_part), ("flex_work", work_part),
                       ("traced_memory_llama_3_1_8b_lora", trace_part),
                       ("loss_base_lora", lambda: loss_part(args.steps, 512)),
                       ("loss_scratch", scratch_part)):
        started = time.perf_counter()
        result[name] = part()
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
