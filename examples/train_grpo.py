"""GRPO on the shipped base: sample answers to the shipped chat questions, reward the right ones.

    python examples/train_grpo.py              # CPU, LoRA, a few minutes
    python examples/train_grpo.py --quick      # a handful of steps (the slow-marked test)

Each training question (examples/data/train.jsonl, its last assistant message the answer) gets
G sampled completions; the reward is exact match with the answer plus a small length penalty.
Before and after training it reports, on the held-out questions (examples/data/eval.jsonl), the
mean reward and the exact match of greedy replies, and the KL of the last step, and writes them
to --out (default docs/benchmarks/grpo_cpu.json; --quick writes nothing unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import minift
from minift.data.sft import load_jsonl
from minift.objectives import rewards
from minift.objectives.grpo import GRPOObjective, prompt_rows

HERE = Path(__file__).resolve().parent


def rows_of(path: Path, limit: int) -> list[dict]:
    """{"prompt": the user's question, "answer": the assistant's reply} per chat row."""
    out = []
    for row in load_jsonl(path)[:limit]:
        messages = row["messages"]
        out.append({"prompt": messages[-2]["content"], "answer": messages[-1]["content"]})
    return out


def score(model, tokenizer, rows, reward, config) -> dict:
    """Mean reward and exact match of greedy replies to ``rows``."""
    objective = GRPOObjective(None, reward, tokenizer, group_size=2, max_new_tokens=config.grpo_max_new_tokens,
                              kl_beta=0.0, pad_id=config.pad_id)
    mean = objective.evaluate(model, prompt_rows(rows, tokenizer, "rows"), config, "cpu")["eval_reward"]
    exact = GRPOObjective(None, rewards.exact_match(), tokenizer, max_new_tokens=config.grpo_max_new_tokens,
                          kl_beta=0.0, pad_id=config.pad_id)
    hits = exact.evaluate(model, prompt_rows(rows, tokenizer, "rows"), config, "cpu")["eval_reward"]
    return {"mean_reward": round(mean, 4), "exact_match": round(hits, 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "base"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--output-dir", default="runs/train_grpo")
    p.add_argument("--out", default=None, help="JSON of the measured numbers")
    p.add_argument("--quick", action="store_true", help="3 steps, 16 held-out prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_rows = 3, 16
    out = args.out or (None if args.quick else "docs/benchmarks/grpo_cpu.json")
    torch.manual_seed(0)
    model = minift.load_model(args.model, dtype=torch.float32, device="cpu")
    tokenizer = minift.load_tokenizer(args.model)
    minift.lora_wrap(model, r=16, alpha=32)
    train_rows = rows_of(HERE / "data" / "train.jsonl", 800)
    eval_rows = rows_of(HERE / "data" / "eval.jsonl", args.eval_rows)
    reward = rewards.combine(rewards.exact_match(), (rewards.length_penalty(24), 0.1))
    config = minift.TrainConfig(method="lora", objective="grpo", learning_rate=args.lr, max_steps=args.steps,
                                micro_batch_size=args.prompts_per_step, grpo_group_size=args.group_size,
                                grpo_max_new_tokens=12, grpo_kl_beta=0.04, bf16=False, device="cpu",
                                warmup_ratio=0.0, lr_scheduler="constant", output_dir=args.output_dir,
                                progress=False, pad_id=tokenizer.pad_token_id or 0)
    before = score(model, tokenizer, eval_rows, reward, config)
    t0 = time.perf_counter()
    summary = minift.train(model, train_rows, config, reward_fn=reward, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    after = score(model, tokenizer, eval_rows, reward, config)
    log = [json.loads(x) for x in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    result = {"device": "cpu", "steps": summary["steps"], "prompts_per_step": args.prompts_per_step,
              "group_size": args.group_size, "learning_rate": args.lr, "eval_prompts": len(eval_rows),
              "before": before, "after": after, "final_kl": round(log[-1]["kl"], 5),
              "train_reward_first_steps": round(sum(x["reward_mean"] for x in log[:5]) / len(log[:5]), 4),
              "train_reward_last_steps": round(sum(x["reward_mean"] for x in log[-5:]) / len(log[-5:]), 4),
              "train_seconds": round(seconds, 1)}
    print(json.dumps(result, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
