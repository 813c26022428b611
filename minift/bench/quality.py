"""``python -m minift bench quality``: how much task quality LoRA and QLoRA give up against full
fine-tuning of the same pretrained model, and what they save in memory.

The same model is fine-tuned three ways on the same rows with `minift.train`, each method at its
own learning rate (full fine-tuning wants a smaller one than the adapters), for each of N seeds.
Every run is scored on the held-out rows of the task (greedy replies: exact match, token F1 and,
for JSON replies, JSON validity and field accuracy), its held-out loss, and the forgetting check
of `minift.evaluation.forgetting.evaluate` before and after (general-text perplexity and
multiple-choice accuracy). The memory of the first training step comes from the loop's
`MemoryTracker` report (tensor bytes alive at the peak), the step time is the median of the
later steps. Per method: mean and spread over seeds; LoRA/full and QLoRA/full ratios of the
task score. Output: a markdown table on stdout, a JSON file and a PNG bar chart.

The "before" side of the forgetting check is the model each method starts from: the float base
for full and LoRA, the NF4-quantized base for QLoRA (its general perplexity already moved when
the weights were rounded, before any training).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

import torch

from minift.bench.methods import EXAMPLES, _untracked_speed
from minift.bench.runinfo import git_commit, git_modified, machine_info, portable_paths
from minift.data.sft import load_jsonl, row_to_messages, tokenize_rows
from minift.evaluation.forgetting import accuracy_drop, evaluate, forgetting, generate_replies, load_texts
from minift.evaluation.metrics import is_json, task_metrics
from minift.evaluation.multiple_choice import load_choice_rows
from minift.evaluation.png import BLACK, GRAY, PALETTE, Canvas, text_width
from minift.files import write_json
from minift.lora.layer import lora_wrap
from minift.models.loading import load_model
from minift.models.tokenizer import load_tokenizer
from minift.training.config import TrainConfig
from minift.training.loop import train

METHODS = ("full", "lora", "qlora")
DATA = os.path.join(EXAMPLES, "data")
# the published claims the table is read against: share of full fine-tuning's task score
CLAIMS = {"lora": (0.99, 0.995), "qlora": (0.98, 0.99)}


def add_quality_arguments(parser) -> None:
    """The options of ``minift bench quality``."""
    parser.add_argument("--model", required=True,
                        help="base model: a checkpoint directory or a .gguf file")
    parser.add_argument("--task", default="extract",
                        help="NAME (examples/data/NAME_train.jsonl and NAME_eval.jsonl) or a "
                             "*_train.jsonl file with its *_eval.jsonl beside it")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method, seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--methods", default="full,lora,qlora", help="comma-separated subset of "
                        + ",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=4, dest="batch_size", help="examples per step")
    parser.add_argument("--max-length", type=int, default=192, dest="max_length",
                        help="longest training example in tokens (longer rows are cut)")
    parser.add_argument("--lr-full", type=float, default=2e-5, dest="lr_full",
                        help="learning rate of full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=2e-4, dest="lr_lora",
                        help="learning rate of LoRA and QLoRA")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank on every linear layer (alpha = 2 r)")
    parser.add_argument("--train-rows", type=int, default=None, dest="train_rows",
                        help="use the first N training rows (default all)")
    parser.add_argument("--eval-rows", type=int, default=24, dest="eval_rows",
                        help="held-out rows scored (the first N): greedy replies and held-out loss")
    parser.add_argument("--max-new-tokens", type=int, default=48, dest="max_new_tokens",
                        help="longest greedy reply in tokens")
    parser.add_argument("--general", default=os.path.join(DATA, "general.jsonl"),
                        help="plain-text JSONL for the general perplexity")
    parser.add_argument("--mc", default=os.path.join(DATA, "general_mc.jsonl"),
                        help="multiple-choice JSONL of the forgetting check")
    parser.add_argument("--mc-rows", type=int, default=None, dest="mc_rows",
                        help="score the first N multiple-choice questions (default all)")
    parser.add_argument("--sweep-lr-lora", type=_numbers(float), default=[], dest="sweep_lr_lora",
                        help="extra seed-0 LoRA runs at these learning rates (comma-separated)")
    parser.add_argument("--sweep-r", type=_numbers(int), default=[], dest="sweep_r",
                        help="extra seed-0 LoRA runs at these ranks (alpha = 2 r), at --lr-lora")
    parser.add_argument("--sweep-lr-full", type=_numbers(float), default=[], dest="sweep_lr_full",
                        help="extra seed-0 full fine-tuning runs at these learning rates")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--work-dir", default="runs/bench_quality", dest="work_dir",
                        help="training runs (replaced on every bench)")
    parser.add_argument("--out", default="runs/bench_quality/quality.json", help="JSON result file")
    parser.add_argument("--png", default=None, help="bar chart (default: the --out path with .png)")


def _numbers(kind):
    """argparse type: a comma-separated list of positive finite numbers of ``kind``."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be a finite number > 0")
        return values
    return parse


def task_files(task: str) -> tuple[str, str]:
    """(train, eval) JSONL paths of --task; ValueError naming what is missing."""
    if task.endswith(".jsonl"):
        if not task.endswith("_train.jsonl"):
            raise ValueError(f"--task: {task!r} must be named *_train.jsonl, with *_eval.jsonl beside it")
        train_path, eval_path = task, task[:-len("_train.jsonl")] + "_eval.jsonl"
    else:
        train_path = os.path.join(DATA, f"{task}_train.jsonl")
        eval_path = os.path.join(DATA, f"{task}_eval.jsonl")
    for path in (train_path, eval_path):
        if not os.path.isfile(path):
            raise ValueError(f"--task: no file {path}")
    return train_path, eval_path


# ---- scoring -----------------------------------------------------------------------------
def field_accuracy(prediction: str, reference: str) -> float:
    """Share of the reference JSON object's fields that the prediction has with an equal value;
    0 when the prediction is not a JSON object."""
    ref = json.loads(reference)
    if not is_json(prediction):
        return 0.0
    pred = json.loads(prediction)
    if not isinstance(pred, dict):
        return 0.0
    return sum(k in pred and pred[k] == v for k, v in ref.items()) / len(ref)


def json_task(references) -> bool:
    """True when every reference reply is a JSON object: the task is scored by field accuracy."""
    return all(r.strip().startswith("{") and is_json(r) and isinstance(json.loads(r), dict) for r in references)


def score(model, tok, task, args, general, mc_rows) -> dict:
    """Task metrics of greedy replies to the held-out prompts, general-text perplexity and
    multiple-choice accuracy of `model`."""
    conversations, references = task["conversations"], task["references"]
    t0 = time.perf_counter()
    replies = generate_replies(model, tok, conversations, "cpu", max_new_tokens=args.max_new_tokens)
    metrics = task_metrics(replies, references)
    if task["json"]:
        metrics["field_accuracy"] = sum(map(field_accuracy, replies, references)) / len(references)
    forget = evaluate(model, tok, general_texts=general, device="cpu", max_length=args.max_length,
                      mc_rows=mc_rows)
    mc = forget["multiple_choice"]
    return {"task": metrics, "samples": [{"want": w, "got": g} for w, g in zip(references[:3], replies[:3])],
            "general": forget["general"], "multiple_choice": {k: mc[k] for k in ("acc", "acc_norm", "n")},
            "seconds": time.perf_counter() - t0}


def primary_metric(is_json_task: bool) -> str:
    """The task score the ratios are taken of: field accuracy for JSON replies, else token F1."""
    return "field_accuracy" if is_json_task else "token_f1"


# ---- the runs ----------------------------------------------------------------------------
def _progress(text: str) -> None:
    print(f"minift bench quality: {text}", file=sys.stderr, flush=True)


def load_task(args, tok) -> dict:
    """Train examples, held-out examples (for the loss) and held-out prompts/replies."""
    train_path, eval_path = task_files(args.task)
    train_rows = load_jsonl(train_path)[:args.train_rows]
    eval_rows = load_jsonl(eval_path)[:args.eval_rows]
    if not train_rows or not eval_rows:
        raise ValueError(f"--task: {train_path if not train_rows else eval_path} has no rows")
    train_ex, _ = tokenize_rows(train_rows, tok, args.max_length, source=train_path)
    eval_ex, _ = tokenize_rows(eval_rows, tok, args.max_length, source=eval_path)
    messages = [row_to_messages(r, where=f"{eval_path}:{i + 1}") for i, r in enumerate(eval_rows)]
    refs = [m[-1]["content"] for m in messages]
    return {"train_path": train_path, "eval_path": eval_path, "train": train_ex, "eval": eval_ex,
            "conversations": [m[:-1] for m in messages], "references": refs, "json": json_task(refs),
            "train_rows": len(train_rows), "eval_rows": len(eval_rows)}


def _load(args, method):
    return load_model(args.model, dtype=torch.float32, quantize="nf4" if method == "qlora" else None)


def run_one(args, method, seed, tok, task, general, mc_rows, lr=None, r=None) -> dict:
    """Fine-tune one method with one seed (at ``lr`` and rank ``r``, default the flags'), then
    score it."""
    r = args.r if r is None else r
    run_dir = os.path.join(args.work_dir, f"{method}-seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench owns its run folders: never resumed
    torch.manual_seed(seed)
    model = _load(args, method)
    if method != "full":
        lora_wrap(model, r=r, alpha=2 * r)
    if lr is None:
        lr = args.lr_full if method == "full" else args.lr_lora
    config = TrainConfig(method=method, optimizer="adamw", max_steps=args.steps, learning_rate=lr,
                         micro_batch_size=args.batch_size, bf16=False, device="cpu", seed=seed,
                         pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                         output_dir=run_dir, progress=False, keep_last=1)
    t0 = time.perf_counter()
    summary = train(model, task["train"], config, eval_data=task["eval"])
    train_s = time.perf_counter() - t0
    step_s, tok_s = _untracked_speed(run_dir)
    after = score(model, tok, task, args, general, mc_rows)
    shutil.rmtree(os.path.join(run_dir), ignore_errors=True)  # checkpoints of a 135M model: not kept
    del model
    return {"method": method, "seed": seed, "learning_rate": lr, "r": None if method == "full" else r,
            "train_seconds": train_s,
            "step_time_s": step_s, "tokens_per_s": tok_s, "final_train_loss": summary["last_loss"],
            "eval_loss": summary["eval_loss"], "trainable_params": summary["trainable_params"],
            "memory": summary["memory"], "after": after}


def _spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list, before: dict, metric: str) -> dict:
    """Per method: mean/spread over seeds of the task score, held-out loss, forgetting and cost."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        base = before["nf4" if method == "qlora" else "float"]
        forget = [forgetting(base["general"], r["after"]["general"]) for r in mine]
        drops = [accuracy_drop(base["multiple_choice"], r["after"]["multiple_choice"]) for r in mine]
        out[method] = {
            "task_score": _spread([r["after"]["task"][metric] for r in mine]),
            "exact_match": _spread([r["after"]["task"]["exact_match"] for r in mine]),
            "json_valid": _spread([r["after"]["task"].get("json_valid") for r in mine]),
            "eval_loss": _spread([r["eval_loss"] for r in mine]),
            "general_perplexity_before": base["general"]["perplexity"],
            "general_perplexity_after": _spread([r["after"]["general"]["perplexity"] for r in mine]),
            "general_perplexity_change": _spread([f["relative_change"] for f in forget]),
            "mc_acc_before": base["multiple_choice"]["acc"],
            "mc_acc_after": _spread([r["after"]["multiple_choice"]["acc"] for r in mine]),
            "mc_acc_drop": _spread([d["acc"]["drop"] for d in drops]),
            "task_score_before": base["task"][metric],
            "peak_memory_bytes": _spread([(r["memory"] or {}).get("peak") for r in mine]),
            "step_time_s": _spread([r["step_time_s"] for r in mine]),
            "trainable_params": mine[0]["trainable_params"], "learning_rate": mine[0]["learning_rate"]}
    full = out.get("full", {}).get("task_score", {}).get("mean")
    for method in ("lora", "qlora"):
        if method in out:
            mean = out[method]["task_score"]["mean"]
            out[method]["ratio_to_full"] = mean / full if full else None
            out[method]["claimed_ratio"] = list(CLAIMS[method])
    return out


def measure(args) -> dict:
    """Every run of the bench; the record written as JSON."""
    methods = [m for m in args.methods.split(",") if m]
    tok = load_tokenizer(args.model)
    task = load_task(args, tok)
    metric = primary_metric(task["json"])
    general = load_texts(args.general)
    mc_rows = load_choice_rows(args.mc)[:args.mc_rows]
    before = {}
    for kind in (["float"] if methods != ["qlora"] else []) + (["nf4"] if "qlora" in methods else []):
        _progress(f"scoring the {kind} base before training ...")
        model = _load(args, "qlora" if kind == "nf4" else "full")
        before[kind] = score(model, tok, task, args, general, mc_rows)
        del model
    runs = []
    for seed in range(args.seeds):
        for method in methods:
            _progress(f"seed {seed}: {method}, {args.steps} steps ...")
            runs.append(run_one(args, method, seed, tok, task, general, mc_rows))
            r = runs[-1]
            _progress(f"seed {seed}: {method}: {metric} {r['after']['task'][metric]:.3f}, eval loss "
                      f"{r['eval_loss']:.4f}, {r['step_time_s']:.1f} s/step")
    sweep = []
    for method, lr, r in sweep_points(args):
        _progress(f"sweep: {method} lr {lr:g}" + (f" r {r}" if method != "full" else "") + ", seed 0 ...")
        run = run_one(args, method, 0, tok, task, general, mc_rows, lr=lr, r=r)
        sweep.append({k: run[k] for k in ("method", "learning_rate", "r", "eval_loss", "step_time_s")}
                     | {"task_score": run["after"]["task"][metric], "peak_memory_bytes": (run["memory"] or {}).get("peak")})
    return {"metric": metric, "task": {k: task[k] for k in ("train_path", "eval_path", "train_rows",
                                                                "eval_rows", "json")},
            "before": before, "runs": runs, "methods": summarize(runs, before, metric), "sweep": sweep}


def sweep_points(args) -> list:
    """(method, lr, r) of the extra seed-0 runs the --sweep-* flags ask for: LoRA at each
    --sweep-lr-lora (rank --r), LoRA at each --sweep-r (lr --lr-lora), full at each --sweep-lr-full."""
    return ([("lora", lr, args.r) for lr in args.sweep_lr_lora] + [("lora", args.lr_lora, r) for r in args.sweep_r]
            + [("full", lr, None) for lr in args.sweep_lr_full])


# ---- output ------------------------------------------------------------------------------
def _pm(s: dict, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if s["mean"] is None:
        return "n/a"
    text = fmt.format(s["mean"] * scale)
    return text if s["std"] is None else f"{text} ± {fmt.format(s['std'] * scale)}"


def markdown(record: dict) -> str:
    """One table: a row per method."""
    metric = record["metric"].replace("_", " ")
    head = ["method", "lr", f"{metric} (before → after)", "ratio to full (claim)", "exact match",
            "JSON valid", "held-out loss", "general ppl before → after", "MC acc before → after",
            "peak MiB (tracked)", "s/step", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for method, m in record["methods"].items():
        ratio = "—" if method == "full" else (
            "n/a" if m.get("ratio_to_full") is None else
            f"{100 * m['ratio_to_full']:.1f}% ({100 * m['claimed_ratio'][0]:g}-{100 * m['claimed_ratio'][1]:g}%)")
        cells = [method, f"{m['learning_rate']:g}", f"{m['task_score_before']:.3f} → {_pm(m['task_score'])}",
                 ratio, _pm(m["exact_match"]), _pm(m["json_valid"]), _pm(m["eval_loss"]),
                 f"{m['general_perplexity_before']:.2f} → {_pm(m['general_perplexity_after'], '{:.2f}')}",
                 f"{m['mc_acc_before']:.2f} → {_pm(m['mc_acc_after'], '{:.2f}')}",
                 _pm(m["peak_memory_bytes"], "{:.0f}", 2 ** -20), _pm(m["step_time_s"], "{:.2f}"),
                 f"{m['trainable_params'] / 1e6:.2f}M"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max(m["task_score"]["n"] for m in record["methods"].values())
    lines.append(f"\n± is the standard deviation over {seeds} seeds" if seeds > 1 else
                 "\none seed: no spread")
    if record.get("sweep"):
        lines += ["", "Sweep (seed 0; the main runs' seed 0 beside it):", "",
                  f"| method | lr | r | {metric} | held-out loss | peak MiB | s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
        main = [{**r, "task_score": r["after"]["task"][record["metric"]],
                 "peak_memory_bytes": (r["memory"] or {}).get("peak")}
                for r in record["runs"] if r["seed"] == 0 and r["method"] in ("full", "lora")]
        for r in sorted(main + record["sweep"], key=lambda r: (r["method"], r["r"] or 0, r["learning_rate"])):
            peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
            lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['r'] or '—'} | {r['task_score']:.3f} | "
                         f"{r['eval_loss']:.4f} | {peak} | {r['step_time_s']:.2f} |")
    return "\n".join(lines)


def chart(record: dict, path: str) -> None:
    """Two bar panels, a bar per method: the task score (a whisker from the lowest to the highest
    seed) and the tracked peak memory in MiB."""
    methods = list(record["methods"])
    panels = [(record["metric"].replace("_", " "), [record["methods"][m]["task_score"] for m in methods], 1.0),
              ("peak MIB", [record["methods"][m]["peak_memory_bytes"] for m in methods], 2 ** -20)]
    bar_w, gap, plot_h, top, left = 56, 24, 200, 48, 56
    panel_w = left + len(methods) * (bar_w + gap) + gap
    canvas = Canvas(max(2 * panel_w + 16, 320), top + plot_h + 48)
    canvas.text(8, 6, "FULL VS LORA VS QLORA")
    for k, (title, stats, scale) in enumerate(panels):
        x0 = 8 + k * panel_w
        hi = max([(s["max"] or 0) * scale for s in stats] + [1e-12])
        if k == 0:
            hi = max(hi, 1.0)
        canvas.text(x0, 24, title)
        base_y = top + plot_h
        canvas.line(x0 + left - 4, top, x0 + left - 4, base_y, BLACK)
        canvas.line(x0 + left - 4, base_y, x0 + panel_w - 8, base_y, BLACK)
        label = f"{hi:.2f}" if hi < 10 else f"{hi:.0f}"
        canvas.text(x0 + left - 10 - text_width(label), top - 4, label)
        canvas.text(x0 + left - 10 - text_width("0"), base_y - 8, "0")
        for i, (method, s) in enumerate(zip(methods, stats)):
            bx = x0 + left + gap // 2 + i * (bar_w + gap)
            if s["mean"] is not None:
                h = round(s["mean"] * scale / hi * plot_h)
                canvas.rect(bx, base_y - h, bx + bar_w, base_y, PALETTE[i % len(PALETTE)])
                if s["n"] > 1:
                    ylo = base_y - s["min"] * scale / hi * plot_h
                    yhi = base_y - s["max"] * scale / hi * plot_h
                    cx = bx + bar_w // 2
                    canvas.line(cx, ylo, cx, yhi, BLACK, width=2)
                    canvas.line(cx - 8, ylo, cx + 8, ylo, BLACK)
                    canvas.line(cx - 8, yhi, cx + 8, yhi, BLACK)
                value = f"{s['mean'] * scale:.2f}" if scale == 1.0 else f"{s['mean'] * scale:.0f}"
                canvas.text(bx + (bar_w - text_width(value)) // 2, base_y - h - 14, value)
            else:
                canvas.rect(bx, base_y - 4, bx + bar_w, base_y, GRAY)
            canvas.text(bx + (bar_w - text_width(method)) // 2, base_y + 8, method)
    canvas.save(path)


def _check(args, parser) -> None:
    for name in ("seeds", "steps", "batch_size", "max_length", "r", "eval_rows", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("train_rows", "mc_rows", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr_full", "lr_lora"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        parser.error(f"--methods must be distinct names among {','.join(METHODS)}, got {args.methods!r}")
    if not os.path.exists(args.model):
        parser.error(f"--model: no such file or directory {args.model!r}")
    for flag, path in (("--general", args.general), ("--mc", args.mc)):
        if not os.path.isfile(path):
            parser.error(f"{flag}: no file {path!r}")
    try:
        task_files(args.task)
    except ValueError as err:
        parser.error(str(err))


def run_quality(args, parser) -> int:
    """Run ``minift bench quality`` for parsed `args`; bad input ends in `parser.error` (exit 2)."""
    _check(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    commit, modified = git_commit(), git_modified()  # the code that runs: taken before the hour it may take
    try:
        result = measure(args)
    except (ValueError, KeyError, OSError) as err:
        parser.error(f"--model/--task: {err}")
    record = {"command": "python -m minift " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
              "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "git_commit": commit, "git_modified": modified, "settings": vars(args),
              "wall_seconds": time.perf_counter() - t0, **result}
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    record["png"] = png
    record = portable_paths(record)
    write_json(args.out, record)
    chart(record, png)
    print(markdown(record) + f"\n\nJSON: {args.out}\nPNG: {png}")
    return 0
