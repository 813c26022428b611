"""Accuracy of the shipped base on the shipped multiple-choice set, 0-shot and 3-shot, and the time
each takes: the numbers in docs/dpo.md ("Multiple-choice questions").

    python examples/multiple_choice_measure.py --out docs/benchmarks/multiple_choice_cpu.json

The base is a tiny model pretrained on numbers in words only; near chance (25% on four choices)
is what it should score. The point is the scoring path and its cost, measured on this machine.
"""
from __future__ import annotations

import argparse
import time

import torch

import minift
from minift.bench.runinfo import git_commit, machine_info
from minift.evaluation.multiple_choice import load_choice_rows
from minift.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/base", help="run from the repository root")
    parser.add_argument("--rows", default="examples/data/general_mc.jsonl")
    parser.add_argument("--shots", default="0,3", help="few-shot counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the fastest is kept)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = minift.load_model(args.model, dtype=torch.float32)
    tokenizer = minift.load_tokenizer(args.model)
    rows = load_choice_rows(args.rows)
    runs = []
    for shots in [int(s) for s in args.shots.split(",")]:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = minift.multiple_choice(model, tokenizer, rows, num_fewshot=shots,
                                            batch_size=args.batch_size, seed=0)
            times.append(time.perf_counter() - start)
        runs.append({"num_fewshot": shots, "acc": result["acc"], "acc_norm": result["acc_norm"],
                     "n": result["n"], "seconds_best": round(min(times), 3),
                     "seconds_all": [round(t, 3) for t in times], "batch_size": args.batch_size})
        print(f"{shots}-shot: acc {result['acc']:.2%}  acc_norm {result['acc_norm']:.2%}  "
              f"({result['n']} questions, best of {args.repeats}: {min(times):.2f} s)")
    if args.out:
        write_json(args.out, {"machine": machine_info(), "commit": git_commit(), "model": args.model,
                              "rows": args.rows, "dtype": "float32", "threads": torch.get_num_threads(),
                              "runs": runs}, sort_keys=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
