"""``python -m minift bench``: full vs LoRA vs QLoRA, measured.

It fine-tunes the same base three ways (full with 8-bit AdamW, LoRA, QLoRA) on the same data for
the same steps with `minift.train`, then writes one table (markdown on stdout, JSON on disk) with
the measured memory breakdown of a training step, step time, tokens/s, final train loss, eval
loss and exact-match accuracy of greedy answers, plus a stacked-bar chart.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from minift.bench.runinfo import SOURCE_ROOT, git_commit, git_modified, machine_info
from minift.data.sft import load_dataset, load_jsonl, row_to_messages
from minift.files import atomic_write, write_json
from minift.lora.layer import lora_wrap
from minift.memory.tracker import CATEGORIES
from minift.models.generation import generate
from minift.models.loading import load_model
from minift.models.tokenizer import load_tokenizer
from minift.training.config import TrainConfig
from minift.training.loop import train

BENCH_METHODS = (("full", "adamw8bit"), ("lora", "adamw"), ("qlora", "adamw"))
# the shipped base and data, found from the package (as examples/train_llama.py finds them from
# itself), so `python -m minift bench` works from any folder of a source checkout
EXAMPLES = os.path.join(SOURCE_ROOT, "examples")


def add_bench_arguments(parser) -> None:
    """The options of ``minift bench``."""
    parser.add_argument("--model", default=os.path.join(EXAMPLES, "base"),
                        help="base checkpoint directory")
    parser.add_argument("--data", default=os.path.join(EXAMPLES, "data"),
                        help="directory with train.jsonl and eval.jsonl (or one train .jsonl file)")
    # Defaults: the shipped examples/base learns the number-words task to a useful held-out
    # exact match in 300 steps of 16 (as examples/train_llama.py does in 400), a few minutes on
    # a 2-core CPU for all three methods, so the quality columns compare something.
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=16, dest="batch_size",
                        help="examples per micro-batch")
    parser.add_argument("--max-length", type=int, default=256, dest="max_length",
                        help="longest example in tokens")
    parser.add_argument("--lr-full", type=float, default=1e-3, dest="lr_full",
                        help="learning rate of full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=3e-3, dest="lr_lora",
                        help="learning rate of LoRA and QLoRA")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--eval-samples", type=int, default=100, dest="eval_samples",
                        help="eval prompts answered greedily for exact match (the first N)")
    # step time and tokens/s are medians over the steps after the first: the first step runs
    # under the memory tracker, which watches every operator
    parser.add_argument("--max-new-tokens", type=int, default=12, dest="max_new_tokens",
                        help="longest greedy answer in tokens")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--output-dir", default="runs/bench", dest="output_dir",
                        help="training runs, results.json, results.md and memory_breakdown.png")
    parser.add_argument("--chart", default=None, help="chart path (default OUTPUT_DIR/memory_breakdown.png)")
    parser.add_argument("--no-chart", action="store_true", dest="no_chart", help="skip the chart")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights init and data order")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is faster for "
                             "small models on a CPU shared with other work")


def run_bench(args, parser) -> int:
    """Run ``minift bench`` for parsed `args`; bad input goes through `parser.error` (exit 2)."""
    for name in ("steps", "batch_size", "max_length", "r", "eval_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr_full", "lr_lora"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):  # NaN fails every comparison: test finiteness
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.device is not None:
        _check_device(args.device, parser)
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model: no config.json in {args.model!r}"
                     + (" (the shipped examples come with a source checkout of minift)"
                        if args.model == os.path.join(EXAMPLES, "base") else ""))
    train_path, eval_path = _data_paths(args.data, parser)
    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the chart needs matplotlib: pip install minift[plot] (or pass --no-chart)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_bench_data(args, train_path, eval_path, parser)
    results = compare_methods(args, train_path, eval_path, data=data)
    record = {"command": "python -m minift " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
              "machine": machine_info(), "git_commit": git_commit(),
              "git_modified": git_modified(), "settings": vars(args),
              "results": results}
    print(write_outputs(record, args))
    return 0


def _check_device(device, parser) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device must be cpu or cuda (or cuda:N), got {device!r}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine")


def load_bench_data(args, train_path, eval_path, parser=None):
    """(tokenizer, train examples, eval rows, eval examples); bad files end in parser.error."""
    try:
        tok = load_tokenizer(args.model)
        train_ex, _ = load_dataset(train_path, tok, args.max_length)
        eval_rows = load_jsonl(eval_path)[:args.eval_samples] if eval_path else []
        eval_ex = load_dataset(eval_path, tok, args.max_length)[0] if eval_path else None
    except (ValueError, KeyError, TypeError, OSError) as err:
        if parser is None:
            raise
        parser.error(f"--model/--data: {err}")
    return tok, train_ex, eval_rows, eval_ex


def compare_methods(args, train_path, eval_path, data=None) -> list:
    """Fine-tune full / LoRA / QLoRA with the same data and steps; one result dict per method."""
    tok, train_ex, eval_rows, eval_ex = data or load_bench_data(args, train_path, eval_path)
    results = []
    for i, (method, optimizer) in enumerate(BENCH_METHODS, start=1):
        _progress(f"[{i}/{len(BENCH_METHODS)}] {method} ({optimizer}): {args.steps} steps ...")
        run_dir = os.path.join(args.output_dir, method)
        # the bench owns its run folders: a run of an earlier bench is replaced, never resumed
        shutil.rmtree(run_dir, ignore_errors=True)
        torch.manual_seed(args.seed)
        model = load_model(args.model, dtype=torch.bfloat16, device=args.device,
                                  quantize="nf4" if method == "qlora" else None)
        if method != "full":
            lora_wrap(model, r=args.r, alpha=2 * args.r)
        config = TrainConfig(
            method=method, optimizer=optimizer, max_steps=args.steps,
            learning_rate=args.lr_full if method == "full" else args.lr_lora,
            micro_batch_size=args.batch_size, bf16=False, device=args.device, seed=args.seed,
            pad_id=tok.pad_token_id, output_dir=run_dir,
            progress=False, keep_last=1)
        t0 = time.perf_counter()
        summary = train(model, train_ex, config, eval_data=eval_ex)
        wall = time.perf_counter() - t0
        step_s, tok_s = _untracked_speed(config.output_dir)
        results.append({
            "method": method, "optimizer": optimizer, "memory": summary["memory"],
            "step_time_s": step_s, "tokens_per_s": tok_s, "final_train_loss": summary["last_loss"],
            "eval_loss": summary["eval_loss"], "trainable_params": summary["trainable_params"],
            "exact_match": _exact_match(model, tok, eval_rows[:args.eval_samples], args),
            "eval_samples": min(len(eval_rows), args.eval_samples), "wall_time_s": wall})
        _progress(f"[{i}/{len(BENCH_METHODS)}] {method}: done in {wall:.1f} s, final train loss "
                  f"{summary['last_loss']:.4f}")
        del model
    return results


def _progress(text: str) -> None:
    """Progress on stderr: stdout carries only the results table."""
    print(f"minift bench: {text}", file=sys.stderr, flush=True)


def _untracked_speed(run_dir):
    """Median step time and tokens/s over the steps after the first (the tracked one is slower)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    steps = [x for x in lines if "tokens_per_s" in x]
    steps = steps[1:] or steps
    seconds = [x["tokens"] / x["tokens_per_s"] for x in steps]
    return statistics.median(seconds), statistics.median(x["tokens_per_s"] for x in steps)


def _exact_match(model, tok, rows, args):
    """Share of rows whose greedy answer equals the reference reply (whitespace-stripped)."""
    if not rows:
        return None
    device = next(model.parameters()).device
    hits = 0
    for i, row in enumerate(rows):
        messages = row_to_messages(row, where=f"eval row {i + 1}")
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt)], device=device)
        out = generate(model, ids, max_new_tokens=args.max_new_tokens,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids.shape[1]:].tolist())
        hits += answer.strip() == messages[-1]["content"].strip()
    return hits / len(rows)


def write_outputs(record: dict, args) -> str:
    """Write results.json, results.md and the chart under the output dir; return the markdown."""
    os.makedirs(args.output_dir, exist_ok=True)
    md = results_markdown(record["results"])
    # atomic: a bench stopped while writing keeps the previous results whole
    write_json(os.path.join(args.output_dir, "results.json"), record)
    atomic_write(os.path.join(args.output_dir, "results.md"),
                 lambda tmp: Path(tmp).write_text(md + "\n", encoding="utf-8"))
    if not args.no_chart:
        chart = args.chart or os.path.join(args.output_dir, "memory_breakdown.png")
        machine = record["machine"]
        where = machine.get("gpu") or machine.get("cpu_model") or machine["processor"]
        memory_chart(record["results"], chart, title=f"one training step on {where}")
        md += f"\n\nchart: {chart}"
    return md


def results_markdown(results: list) -> str:
    """One markdown table: the memory breakdown (MiB) and the quality/speed numbers per method."""
    head = ["method"] + [c.replace("_", " ") for c in CATEGORIES] + [
        "peak", "step time (s)", "tokens/s", "train loss", "eval loss", "exact match"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in results:
        mem = r["memory"] or {}
        cells = [f"{r['method']} ({r['optimizer']})"]
        cells += [f"{mem.get(c, 0) / 2**20:.2f} MiB" for c in CATEGORIES + ("peak",)]
        cells += [f"{r['step_time_s']:.3f}", f"{r['tokens_per_s']:.0f}", _num(r["final_train_loss"]),
                  _num(r["eval_loss"]),
                  "n/a" if r["exact_match"] is None else
                  f"{r['exact_match']:.2f} ({round(r['exact_match'] * r['eval_samples'])}/{r['eval_samples']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x):
    return "n/a" if x is None else f"{x:.4f}"


def memory_chart(results: list, path: str, title: str = "") -> None:
    """Stacked bars of the memory categories per method (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["method"] for r in results]
    bottom = [0.0] * len(results)
    for cat in CATEGORIES:
        values = [(r["memory"] or {}).get(cat, 0) / 2**20 for r in results]
        ax.bar(names, values, bottom=bottom, label=cat.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    peaks = [(r["memory"] or {}).get("peak", 0) / 2**20 for r in results]
    ax.scatter(names, peaks, marker="_", s=900, color="black", zorder=3, label="peak")
    ax.set_ylabel("MiB")
    ax.set_title(f"Where the memory goes: {title}" if title else "Where the memory goes", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _data_paths(data, parser):
    if os.path.isfile(data):
        return data, None
    train = os.path.join(data, "train.jsonl")
    if not os.path.isfile(train):
        parser.error(f"--data: no train.jsonl in {data!r}")
    evalp = os.path.join(data, "eval.jsonl")
    return train, evalp if os.path.isfile(evalp) else None


