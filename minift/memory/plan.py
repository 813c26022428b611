"""Will it fit? The planner behind ``python -m minift plan``.

For a model (preset name or a checkpoint directory with config.json) and a GPU memory size it
estimates full fine-tuning, LoRA and QLoRA side by side with `minift.estimate_memory`, says which
fit, finds the largest batch size and the longest sequence that fit for each, and recommends the
highest-quality method that fits (full > LoRA > QLoRA).

Memory sizes are read by `minift._util.parse_bytes`, the one size grammar of minift: "24GB" is
24e9 bytes, "24GiB" and "24G" are 24 * 2^30.
"""
from __future__ import annotations

import os

import torch

from minift._util import check_choice, fmt_in, format_bytes, parse_bytes, unit_for
from minift.config import ModelConfig
from minift.memory.dpo import estimate_dpo_memory
from minift.memory.estimate import METHODS, estimate_memory
from minift.memory.features import format_feature_plan, plan_features
from minift.memory.tracker import CATEGORIES, breakdown_table

LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
MAX_BATCH = 1 << 16


parse_memory = parse_bytes  # sizes read as everywhere in minift (see minift._util)


def resolve_model(model: str) -> tuple[ModelConfig, str]:
    """(config, display name) for a preset name or a directory/file holding a config.json."""
    if os.path.isdir(model) or model.endswith(".json"):
        return ModelConfig.from_json(model), os.path.basename(os.path.normpath(model))
    if os.sep in model or model.startswith("."):
        raise FileNotFoundError(f"--model: no config.json at {model!r} (not a directory)")
    return ModelConfig.from_name(model), model


def _largest(fits, low: int, high: int) -> int:
    """Largest n in [low, high] with fits(n), assuming fits is monotone; low - 1 if none."""
    if not fits(low):
        return low - 1
    good, step = low, 1
    while good + step <= high and fits(good + step):  # double to bracket the answer
        good, step = good + step, step * 2
    bad = min(good + step, high + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def plan(cfg: ModelConfig, gpu_memory: int, *, batch_size: int = 1, seq_len: int = 2048,
         r: int = 16, optimizer: str = "adamw", gradient_checkpointing: bool = False,
         dtype: torch.dtype = torch.bfloat16, reserve: int = 2**30,
         target_modules="all-linear", objective: str = "sft") -> dict:
    """Estimates and fits for the three methods.

    Args:
        cfg: the model's architecture.
        gpu_memory: bytes of GPU memory.
        batch_size, seq_len: the micro-batch to check.
        r, optimizer, gradient_checkpointing, dtype, target_modules: as for `estimate_memory`.
        reserve: bytes kept free for the CUDA context and allocator slack (a margin chosen by
            the user, not a measurement).
        objective: "sft", or "dpo" (batch_size counts pairs; `estimate_dpo_memory` with its
            default reference: adapters off for LoRA/QLoRA, a frozen copy for full).

    Returns:
        {"methods": {method: {"estimate", "fits", "max_batch_size", "max_seq_len"}},
         "recommendation": method or None, "budget": bytes usable}
    """
    budget = gpu_memory - reserve
    if budget <= 0:
        raise ValueError(f"--reserve ({format_bytes(reserve)}) leaves nothing of --gpu-memory "
                         f"({format_bytes(gpu_memory)})")
    max_pos = cfg.max_position_embeddings
    if seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                         f"({max_pos})")
    out = {}
    check_choice("objective", objective, ("sft", "dpo"))
    estimator = estimate_dpo_memory if objective == "dpo" else estimate_memory
    for method in METHODS:
        def total(b, t, m=method):
            return estimator(cfg, m, b, t, r=r, target_modules=target_modules,
                             optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                             dtype=dtype).total
        est = estimator(cfg, method, batch_size, seq_len, r=r, target_modules=target_modules,
                        optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                        dtype=dtype)
        out[method] = {
            "estimate": est,
            "fits": est.total <= budget,
            "max_batch_size": _largest(lambda b: total(b, seq_len) <= budget, 1, MAX_BATCH),
            "max_seq_len": _largest(lambda t: total(batch_size, t) <= budget, 2, max_pos),
        }
    fitting = [m for m in METHODS if out[m]["fits"]]
    # the memory features the loop offers, turned on one at a time until each method fits
    features = {m: plan_features(cfg, budget, m, batch_size, seq_len, r=r, optimizer=optimizer,
                                 dtype=dtype, target_modules=target_modules) for m in METHODS}
    return {"methods": out, "recommendation": fitting[0] if fitting else None, "budget": budget,
            "max_position_embeddings": max_pos, "objective": objective, "features": features}


def format_plan(result: dict, *, model_name: str, gpu_memory: int, reserve: int,
                batch_size: int, seq_len: int, optimizer: str, r: int,
                gradient_checkpointing: bool) -> str:
    """The planner's report as printed by ``python -m minift plan``."""
    methods = result["methods"]
    ckpt = "on" if gradient_checkpointing else "off"
    lines = [f"model {model_name} | batch {batch_size} x seq {seq_len} | optimizer {optimizer} | "
             f"LoRA r={r} | gradient checkpointing {ckpt}"
             + (" | DPO: batch = pairs, 2x sequences + reference forward"
                if result.get("objective") == "dpo" else ""),
             f"GPU memory {format_bytes(gpu_memory)} ({gpu_memory / 1e9:.2f} GB), minus a reserve of "
             f"{format_bytes(reserve)} for the CUDA context: {format_bytes(result['budget'])} usable",
             ""]
    columns = {LABELS[m]: methods[m]["estimate"].as_dict() for m in METHODS}
    # one unit for the whole table, picked by the largest total: GiB for 7B models, MiB (not
    # "0.00 GiB") for small ones
    unit = unit_for(max(c["total"] for c in columns.values()))
    lines.append(breakdown_table(columns, rows=CATEGORIES + ("total",), bytes_fmt=fmt_in(unit)))
    lines.append("| fits | " + " | ".join("yes" if methods[m]["fits"] else "no" for m in METHODS) + " |")
    lines.append(f"| largest batch at seq {seq_len} | "
                 + " | ".join(_count(methods[m]["max_batch_size"], 1, MAX_BATCH) for m in METHODS) + " |")
    lines.append(f"| longest seq at batch {batch_size} | "
                 + " | ".join(_count(methods[m]["max_seq_len"], 2, result["max_position_embeddings"])
                              for m in METHODS) + " |")
    if "features" in result:
        lines.append(format_feature_plan(result["features"], result["budget"],
                                         result["max_position_embeddings"], format_bytes))
    lines.append("")
    lines.append(_recommend(result, batch_size, seq_len, gradient_checkpointing))
    lines.append("Estimates from first principles (minift.estimate_memory), checked against "
                 "measured CPU steps; see docs/memory.md.")
    return "\n".join(lines)


def _count(n: int, low: int, high: int) -> str:
    if n < low:
        return "none"
    return f"{n} (limit)" if n >= high else str(n)


def _recommend(result, batch_size, seq_len, gradient_checkpointing) -> str:
    best = result["recommendation"]
    methods = result["methods"]
    if best is not None:
        return (f"Recommendation: {LABELS[best]} — the highest-quality method that fits batch "
                f"{batch_size} x seq {seq_len} ({format_bytes(methods[best]['estimate'].total)} of "
                f"{format_bytes(result['budget'])}).")
    smaller = [m for m in METHODS if methods[m]["max_batch_size"] >= 1]
    if smaller:
        m = smaller[0]
        return (f"Recommendation: nothing fits batch {batch_size} x seq {seq_len}; {LABELS[m]} "
                f"fits with batch {methods[m]['max_batch_size']} (use gradient accumulation for "
                f"the rest)" + ("" if gradient_checkpointing else
                                " or try --gradient-checkpointing") + ".")
    return ("Recommendation: nothing fits even at batch 1; "
            + ("try --gradient-checkpointing, a shorter --seq-len or a smaller model."
               if not gradient_checkpointing else "try a shorter --seq-len or a smaller model."))


def add_plan_arguments(parser) -> None:
    """The options of ``minift plan``."""
    parser.add_argument("--model", required=True,
                        help="a preset name (see minift.config.PRESETS) or a directory with config.json")
    parser.add_argument("--gpu-memory", required=True, dest="gpu_memory",
                        help='GPU memory, e.g. 24GB (10^9 bytes), 24GiB or 24G (2^30 bytes), 80000MB')
    parser.add_argument("--seq-len", type=int, default=2048, dest="seq_len")
    parser.add_argument("--batch-size", type=int, default=1, dest="batch_size")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    parser.add_argument("--gradient-checkpointing", action="store_true", dest="gradient_checkpointing")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--objective", default="sft", choices=("sft", "dpo"),
                        help="sft, or dpo (--batch-size counts preference pairs: 2x the sequences, "
                             "plus the reference forward; a frozen copy for full)")
    parser.add_argument("--reserve", default="1GiB",
                        help="memory kept free for the CUDA context and allocator slack (default 1GiB)")


def run_plan(args, parser) -> int:
    """Run ``minift plan`` for parsed `args`; errors go through `parser.error` (exit code 2)."""
    try:
        gpu = parse_memory(args.gpu_memory, "--gpu-memory")
        reserve = parse_memory(args.reserve, "--reserve", allow_zero=True)
        for name in ("batch_size", "seq_len", "r"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {getattr(args, name)}")
        cfg, name = resolve_model(args.model)
        if args.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len} is longer than {name}'s "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        dtype = getattr(torch, args.dtype)
        result = plan(cfg, gpu, batch_size=args.batch_size, seq_len=args.seq_len, r=args.r,
                      optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                      dtype=dtype, reserve=reserve, objective=args.objective)
    except (ValueError, FileNotFoundError, TypeError) as err:
        parser.error(str(err))
    print(format_plan(result, model_name=name, gpu_memory=gpu, reserve=reserve,
                      batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                      r=args.r, gradient_checkpointing=args.gradient_checkpointing))
    return 0
