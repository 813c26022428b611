"""GRPO after SFT: sample answers to the shipped chat questions and reward the right ones.

    python examples/train_grpo.py              # CPU, LoRA on the SFT model, 3 seeds, about a minute
    python examples/train_grpo.py --quick      # a handful of steps (the slow-marked test)

The policy starts from the SFT model, as in examples/train_dpo.py: the SFT adapter of
examples/train_llama.py (trained first with its defaults when missing) merged into the base,
with a fresh LoRA adapter on top; the reference is that model with the new adapter off. Each
training question (examples/data/train.jsonl, its last assistant message the answer) gets G
sampled completions; the reward gives partial credit, 0.5 x exact match + 0.5 x token F1
(minift.evaluation.metrics, as the SFT run scores its replies), so a group of near misses still
has a signal. Each of --seeds runs draws its fresh adapter from its own seed. Before and after
training it reports, on the held-out questions (examples/data/eval.jsonl), the mean reward and
the exact match of greedy replies (after: each run's and their mean), and the KL of the last
steps, and writes them to --out (default docs/benchmarks/grpo_cpu.json; --quick writes
nothing unless --out is given). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import train_llama as sft
from train_dpo import sft_policy
from train_llama import HERE, UsageError, _number

import minift
from minift.bench.runinfo import git_commit, machine_info
from minift.data.sft import load_jsonl
from minift.evaluation import metrics
from minift.objectives.grpo import GRPOObjective, prompt_rows


def task_reward(prompts, completions, rows) -> list:
    """0.5 x exact match + 0.5 x token F1 of each completion against its row's answer."""
    return [0.5 * metrics.exact_match(c, row["answer"]) + 0.5 * metrics.token_f1(c, row["answer"])
            for c, row in zip(completions, rows)]


def exact_reward(prompts, completions, rows) -> list:
    return [metrics.exact_match(c, row["answer"]) for c, row in zip(completions, rows)]


def rows_of(path: Path, limit=None) -> list:
    """{"prompt": the user's question, "answer": the assistant's reply} per chat row."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    return [{"prompt": row["messages"][-2]["content"], "answer": row["messages"][-1]["content"]}
            for row in load_jsonl(path)[:limit]]


def score(model, tokenizer, rows, config) -> dict:
    """Mean reward and exact match of greedy replies to ``rows``, from one pass of generation."""
    exact = []

    def reward(prompts, completions, rows_):
        exact.extend(exact_reward(prompts, completions, rows_))
        return task_reward(prompts, completions, rows_)

    objective = GRPOObjective(None, reward, tokenizer, max_new_tokens=config.grpo_max_new_tokens,
                              kl_beta=0.0, pad_id=config.pad_id)
    mean = objective.evaluate(model, prompt_rows(rows, tokenizer, "rows"), config, "cpu")["eval_reward"]
    return {"mean_reward": round(mean, 4), "exact_match": round(sum(exact) / len(exact), 4)}


def parse_args(argv=None):
    p = sft.OneLineParser(prog="train_grpo.py", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default=str(HERE / "base"), help="the base checkpoint the SFT adapter is for")
    add("--sft-adapter", default="runs/train_llama/adapter",
        help="PEFT adapter from examples/train_llama.py; trained first when missing")
    add("--sft-steps", type=_number(int, 1), default=None,
        help="steps of the SFT run made when --sft-adapter is missing (default: its own)")
    add("--steps", type=_number(int, 1), default=80)
    add("--prompts-per-step", type=_number(int, 1), default=8)
    add("--group-size", type=_number(int, 2), default=8)
    add("--temperature", type=_number(float, 0, strict=True), default=1.0)
    add("--kl-beta", type=_number(float, 0), default=0.04)
    add("--max-new-tokens", type=_number(int, 1), default=12)
    add("--lr", type=_number(float, 0, strict=True), default=3e-3)
    add("--r", type=_number(int, 1), default=8)
    add("--alpha", type=_number(float, 0, strict=True), default=16.0)
    add("--eval-rows", type=_number(int, 1), default=100)
    add("--seed", type=_number(int, 0, maximum=2**32), default=0, help="the first run's seed")
    add("--seeds", type=_number(int, 1), default=3, help="runs, seeds --seed, --seed + 1, ...")
    add("--output-dir", default="runs/train_grpo")
    add("--out", default=None, help="JSON of the measured numbers")
    add("--quick", action="store_true", help="3 steps, 16 held-out prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_rows, args.seeds = 3, 16, 1
    # what train_dpo.sft_model / sft_policy read besides the flags above
    args.method, args.device, args.parallel, args.eval_samples = "lora", "cpu", None, None
    return args


def run_seed(args, seed: int, train_rows, eval_rows, tokenizer, output_dir: str) -> dict:
    """One GRPO run from the SFT model with its fresh adapter drawn from ``seed``."""
    args.seed = seed
    t0 = time.perf_counter()
    trained_sft = not Path(args.sft_adapter).exists()
    model = sft_policy(args, torch.device("cpu"))
    sft_seconds = time.perf_counter() - t0
    config = minift.TrainConfig(method="lora", objective="grpo", learning_rate=args.lr, max_steps=args.steps,
                                micro_batch_size=args.prompts_per_step, grpo_group_size=args.group_size,
                                grpo_max_new_tokens=args.max_new_tokens, grpo_kl_beta=args.kl_beta,
                                grpo_temperature=args.temperature, bf16=False, device="cpu",
                                warmup_ratio=0.0, lr_scheduler="constant", output_dir=output_dir,
                                progress=False, seed=seed, pad_id=tokenizer.pad_token_id or 0)
    t0 = time.perf_counter()
    before = score(model, tokenizer, eval_rows, config)
    t1 = time.perf_counter()
    summary = minift.train(model, train_rows, config, reward_fn=task_reward, tokenizer=tokenizer)
    t2 = time.perf_counter()
    after = score(model, tokenizer, eval_rows, config)
    t3 = time.perf_counter()
    log = [json.loads(x) for x in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    head, tail = log[:5], log[-5:]
    return {"seed": seed, "steps": summary["steps"], "before": before, "after": after,
            "final_kl": round(log[-1]["kl"], 5),
            "kl_last_steps": round(sum(x["kl"] for x in tail) / len(tail), 5),
            "train_reward_first_steps": round(sum(x["reward_mean"] for x in head) / len(head), 4),
            "train_reward_last_steps": round(sum(x["reward_mean"] for x in tail) / len(tail), 4),
            "train_seconds": round(t2 - t1, 1), "eval_seconds": round(t1 - t0 + t3 - t2, 1),
            "grpo_seconds": round(t3 - t0, 1), "sft_seconds": round(sft_seconds, 1),
            "sft_trained_in_this_run": trained_sft}


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]  # other work on the machine slows the timings
    out = args.out or (None if args.quick else "docs/benchmarks/grpo_cpu.json")
    train_rows = rows_of(HERE / "data" / "train.jsonl")
    eval_rows = rows_of(HERE / "data" / "eval.jsonl", args.eval_rows)
    tokenizer = minift.load_tokenizer(args.model)
    first = args.seed
    runs = [run_seed(args, first + k, train_rows, eval_rows, tokenizer,
                     args.output_dir if args.seeds == 1 else str(Path(args.output_dir) / f"seed{first + k}"))
            for k in range(args.seeds)]
    mean = {key: round(sum(r["after"][key] for r in runs) / len(runs), 4) for key in runs[0]["after"]}
    result = {"device": "cpu", "start": "SFT model (adapter merged) + fresh LoRA", "sft_adapter": args.sft_adapter,
              "reward": "0.5 x exact match + 0.5 x token F1 (minift.evaluation.metrics)",
              "steps": runs[0]["steps"], "prompts_per_step": args.prompts_per_step,
              "group_size": args.group_size, "temperature": args.temperature, "kl_beta": args.kl_beta,
              "max_new_tokens": args.max_new_tokens, "learning_rate": args.lr, "r": args.r,
              "eval_prompts": len(eval_rows), "seeds": [r["seed"] for r in runs],
              "before": runs[0]["before"], "after": mean,  # the mean over the seeds' runs
              "final_kl": round(sum(r["final_kl"] for r in runs) / len(runs), 5),
              "train_seconds": round(sum(r["train_seconds"] for r in runs) / len(runs), 1),
              "sft_trained_in_this_run": runs[0]["sft_trained_in_this_run"], "runs": runs,
              "command": "python examples/train_grpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "git_commit": git_commit()}
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:
        print(f"train_grpo.py: error: {err}", file=sys.stderr)
        sys.exit(2)
