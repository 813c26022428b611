"""Will it fit? The planner behind ``python -m minift plan``.

For a model (preset name or a checkpoint directory with config.json) and a GPU memory size it
estimates full fine-tuning, LoRA and QLoRA side by side with `minift.estimate_memory`, says which
fit, finds the largest batch size and the longest sequence that fit for each, and recommends the
highest-quality method that fits (full > LoRA > QLoRA).

Memory sizes are read by `minift.sizes.parse_bytes`, the one size grammar of minift: "24GB" is
24e9 bytes, "24GiB" and "24G" are 24 * 2^30, in any case ("24gb" is 24GB).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from minift.checks import check_choice
from minift.memory.dpo import estimate_dpo_memory
from minift.memory.estimate import METHODS, estimate_memory
from minift.memory.tracker import CATEGORIES, breakdown_table
from minift.models.config import PRESETS, ModelConfig
from minift.sizes import fmt_in, format_bytes, parse_bytes, unit_for
from minift.training.config import TrainConfig

LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
# the training loop's defaults: the plan starts where `minift.train` starts
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
MAX_BATCH = 1 << 16


parse_memory = parse_bytes  # sizes read as everywhere in minift (see minift.sizes)


def fmt_auto(n: float) -> str:
    """Bytes in the largest binary unit that holds at least one whole unit ("0 B" for zero)."""
    return "0 B" if n == 0 else format_bytes(n)


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
         target_modules="all-linear", objective: str = "sft", gpus: int = 1, parallel=None,
         cpu_offload: bool = False, host_memory: int = 128 * 2**30,
         loss_chunk_size=TRAIN_DEFAULTS["loss_chunk_size"]) -> dict:
    """Estimates and fits for the three methods (per GPU when `gpus` > 1).

    Args:
        cfg: the model's architecture.
        gpu_memory: bytes of GPU memory.
        batch_size, seq_len: the micro-batch to check.
        r, optimizer, gradient_checkpointing, dtype, target_modules: as for `estimate_memory`.
        loss_chunk_size: tokens per lm_head + loss chunk, TrainConfig's default (1024) unless
            given; None = full logits.
        reserve: bytes kept free for the CUDA context and allocator slack (a margin chosen by
            the user, not a measurement).
        objective: "sft", or "dpo" (batch_size counts pairs; `estimate_dpo_memory` with its
            default reference: adapters off for LoRA/QLoRA, a frozen copy for full).
        gpus, parallel, cpu_offload: GPUs of the job, "fsdp" (default with gpus > 1) or "ddp",
            and FSDP's CPU offload; with FSDP and no offload, each method is also estimated
            with offload ("offload": its estimate and whether it fits).
        host_memory: bytes of host memory of the machine (all its GPUs' offloaded shards must
            fit; an assumption the user states, 128 GiB unless told).

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
    if gpus > 1 and parallel is None:
        parallel = "fsdp"
    # the hand-written estimate counts a chunked loss for checkpointed steps only: without
    # gradient checkpointing the table shows full logits (the header says so)
    table_chunk = loss_chunk_size if gradient_checkpointing else None
    common = dict(r=r, target_modules=target_modules, optimizer=optimizer, dtype=dtype,
                  gradient_checkpointing=gradient_checkpointing, loss_chunk_size=table_chunk)
    if parallel:
        if objective != "sft":
            raise ValueError("--gpus: the per-GPU plan covers objective 'sft' (minift trains DPO on one process)")
        common.update(world_size=gpus, parallel=parallel)
    for method in METHODS:
        def total(b, t, m=method):
            return estimator(cfg, m, b, t, cpu_offload=cpu_offload, **common).total if parallel else \
                estimator(cfg, m, b, t, **common).total
        est = estimator(cfg, method, batch_size, seq_len, **common,
                        **({"cpu_offload": cpu_offload} if parallel else {}))
        out[method] = {
            "estimate": est,
            # offloaded shards of all the machine's GPUs must fit its host memory too
            "fits": est.total <= budget and gpus * est.terms.get("host_bytes", 0) <= host_memory,
            "max_batch_size": _largest(lambda b: total(b, seq_len) <= budget, 1, MAX_BATCH),
            "max_seq_len": _largest(lambda t: total(batch_size, t) <= budget, 2, max_pos),
        }
        if parallel == "fsdp" and not cpu_offload:
            offloaded = estimator(cfg, method, batch_size, seq_len, cpu_offload=True, **common)
            out[method]["offload"] = {"estimate": offloaded, "fits": offloaded.total <= budget
                                      and gpus * offloaded.terms["host_bytes"] <= host_memory}
    fitting = [m for m in METHODS if out[m]["fits"]]
    settings = dict(r=r, target_modules=target_modules, optimizer=optimizer, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, loss_chunk_size=table_chunk)
    # the memory features the loop offers, turned on one at a time until each method fits
    # (on one GPU; the per-GPU table of a multi-GPU plan has its own offload column instead);
    # for DPO with DPO's estimate (2x sequences, the reference's forward and weights)
    features = None if parallel else {
        m: plan_features(cfg, budget, m, batch_size, seq_len, estimator=estimator, r=r,
                         optimizer=optimizer, dtype=dtype, target_modules=target_modules,
                         loss_chunk_size=table_chunk, wanted_chunk=loss_chunk_size,
                         gradient_checkpointing=gradient_checkpointing) for m in METHODS}
    # the highest-quality method that fits, as asked or with memory features (the features'
    # lines would contradict a recommendation that ignored them)
    recommendation = next((m for m in METHODS if out[m]["fits"]
                           or (features and features[m]["fits"])), None)
    return {"methods": out, "recommendation": recommendation, "budget": budget,
            "max_position_embeddings": max_pos, "objective": objective, "features": features,
            "gpus": gpus, "parallel": parallel, "cpu_offload": cpu_offload, "host_memory": host_memory,
            "loss_chunk_size": table_chunk,
            # the advice re-estimates one-GPU SFT steps; a DPO plan has its own estimator
            "advice": advice(cfg, out, budget, batch_size, seq_len, settings)
            if objective == "sft" and not parallel else []}


# ---- what a user can do about it ------------------------------------------------------------
def advice(cfg, methods: dict, budget: int, batch_size: int, seq_len: int, settings: dict) -> list:
    """Lines of advice with numbers: the host RAM paged states take, a method that fits only
    with gradient checkpointing, and when nothing fits, what would (sharding over GPUs, states
    in host RAM, a shorter sequence)."""
    def est(method, **change):
        kw = dict(settings, **{k: v for k, v in change.items() if k in settings})
        return estimate_memory(cfg, method, change.get("b", batch_size), change.get("t", seq_len),
                               **kw)

    lines = []
    if settings["optimizer"] == "paged_adamw8bit":  # the same 8-bit states, in pages on the host
        host = {m: est(m, optimizer="adamw8bit").optimizer_states for m in METHODS}
        lines.append("paged_adamw8bit keeps the optimizer states in host RAM, not on the GPU: "
                     + ", ".join(f"{LABELS[m]} {format_bytes(host[m])}" for m in METHODS) + ".")
    gc_fits = []
    if not settings["gradient_checkpointing"] and not any(methods[m]["fits"] for m in METHODS):
        for m in METHODS:
            total = est(m, gradient_checkpointing=True).total
            if not methods[m]["fits"] and total <= budget:
                gc_fits.append(m)
                lines.append(f"{LABELS[m]} fits only with --gradient-checkpointing "
                             f"({format_bytes(total)} of {format_bytes(budget)}).")
    if any(methods[m]["fits"] for m in METHODS) or gc_fits:
        return lines
    return lines + _what_would_fit(est, budget, seq_len, cfg.max_position_embeddings,
                                   settings["gradient_checkpointing"])


def _what_would_fit(est, budget: int, seq_len: int, max_pos: int, checkpointing: bool) -> list:
    """Nothing fits one GPU even with gradient checkpointing: the ways out, with numbers (the
    --gradient-checkpointing flag named only where the user has not given it)."""
    with_gc = "" if checkpointing else " and --gradient-checkpointing"
    lines = []
    for m in METHODS:  # weights, gradients and optimizer states divide over N GPUs; activations not
        e = est(m, gradient_checkpointing=True)
        states = e.frozen_weights + e.trainable_params + e.gradients + e.optimizer_states
        rest = e.total - states
        if rest < budget:
            n = -(-states // (budget - rest))
            lines.append(f"{LABELS[m]} would fit on {n} GPUs of this size with weights, gradients and "
                         f"optimizer states sharded {n} ways (FSDP){with_gc}.")
    paged = est("qlora", gradient_checkpointing=True, optimizer="paged_adamw8bit")
    if paged.total <= budget:
        host = est("qlora", gradient_checkpointing=True, optimizer="adamw8bit").optimizer_states
        lines.append(f"QLoRA fits with the optimizer states offloaded to CPU (--optimizer "
                     f"paged_adamw8bit: {format_bytes(host)} of host RAM){with_gc} "
                     f"({format_bytes(paged.total)} of {format_bytes(budget)}).")
    shorter = _largest(lambda t: est("qlora", gradient_checkpointing=True, b=1, t=t).total <= budget,
                       2, min(seq_len, max_pos))
    if shorter >= 2:
        lines.append(f"QLoRA fits at batch 1 with --seq-len {shorter} or shorter{with_gc}.")
    if not lines:
        lines.append("No method fits at batch 1 even with 2 tokens: the weights alone exceed "
                     "this GPU; pick a smaller model.")
    return lines


def format_plan(result: dict, *, model_name: str, gpu_memory: int, reserve: int,
                batch_size: int, seq_len: int, optimizer: str, r: int,
                gradient_checkpointing: bool) -> str:
    """The planner's report as printed by ``python -m minift plan``."""
    methods = result["methods"]
    ckpt = "on" if gradient_checkpointing else "off"
    chunk = result.get("loss_chunk_size")
    lines = [f"model {model_name} | batch {batch_size} x seq {seq_len} | optimizer {optimizer} | "
             f"LoRA r={r} | gradient checkpointing {ckpt} | loss chunk "
             f"{chunk if chunk else 'off (full logits' + ('' if gradient_checkpointing else '; the estimate of a chunked loss needs gradient checkpointing') + ')'}"
             + (" | DPO: batch = pairs, 2x sequences + reference forward"
                if result.get("objective") == "dpo" else ""),
             *([f"{result['gpus']} GPUs, {result['parallel'].upper()}"
                + (" with CPU offload" if result["cpu_offload"] else "")
                + f": memory per GPU (batch {batch_size} x seq {seq_len} on each GPU)"]
               if result.get("parallel") else []),
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
    host = {m: methods[m]["estimate"].terms.get("host_bytes", 0) for m in METHODS}
    if any(host.values()):
        lines.append("| host memory per GPU (offloaded shards, paged states) | "
                     + " | ".join(format_bytes(host[m]) for m in METHODS) + " |")
    if all("offload" in methods[m] for m in METHODS):
        gpus = result["gpus"]
        lines.append("| with CPU offload: per GPU | "
                     + " | ".join(f"{format_bytes(methods[m]['offload']['estimate'].total)} "
                                  f"({'fits' if methods[m]['offload']['fits'] else 'no'})" for m in METHODS) + " |")
        lines.append(f"| with CPU offload: host, all {gpus} GPUs (of {format_bytes(result['host_memory'])}) | "
                     + " | ".join(format_bytes(gpus * methods[m]["offload"]["estimate"].terms["host_bytes"])
                                  for m in METHODS) + " |")
    if result.get("features"):
        lines.append(format_feature_plan(result["features"], result["budget"],
                                         result["max_position_embeddings"], format_bytes))
    lines.append("")
    lines.append(_recommend(result, batch_size, seq_len, gradient_checkpointing))
    lines += result.get("advice", [])
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
    if best is not None and methods[best]["fits"]:
        return (f"Recommendation: {LABELS[best]} — the highest-quality method that fits batch "
                f"{batch_size} x seq {seq_len} ({format_bytes(methods[best]['estimate'].total)} of "
                f"{format_bytes(result['budget'])}).")
    if best is not None:
        feat = result["features"][best]
        plain = next((m for m in METHODS if methods[m]["fits"]), None)
        without = (f" Without memory features {LABELS[plain]} fits as asked "
                   f"({format_bytes(methods[plain]['estimate'].total)})." if plain else "")
        return (f"Recommendation: {LABELS[best]} — the highest-quality method that fits batch "
                f"{batch_size} x seq {seq_len}, with {', '.join(feat['features'])} "
                f"({format_bytes(feat['estimate'].total)} of {format_bytes(result['budget'])}): "
                f"{train_config_text(best, feat['settings'])}.{without}")
    offload = [m for m in METHODS if methods[m].get("offload", {}).get("fits")]
    if offload:
        m, est = offload[0], methods[offload[0]]["offload"]["estimate"]
        return (f"Recommendation: {LABELS[m]} with FSDP CPU offload (--fsdp-cpu-offload) — nothing fits "
                f"batch {batch_size} x seq {seq_len} without it; with it {format_bytes(est.total)} per GPU "
                f"and {format_bytes(est.terms['host_bytes'])} of host memory per GPU.")
    smaller = [m for m in METHODS if methods[m]["max_batch_size"] >= 1]
    gradient_checkpointing = gradient_checkpointing or bool(result.get("features"))
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
    """The options of ``minift plan`` (every one with help, so --help shows every default)."""
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}) or a directory with config.json")
    parser.add_argument("--gpu-memory", required=True, dest="gpu_memory",
                        help="GPU memory, e.g. 24GB (10^9 bytes), 24GiB or 24G (2^30 bytes), 80000MB; "
                             "units in any case (24gb)")
    parser.add_argument("--seq-len", type=int, default=2048, dest="seq_len", help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, dest="batch_size",
                        help="sequences per micro-batch")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "paged_adamw8bit"),
                        help="optimizer whose states are counted")
    parser.add_argument("--gradient-checkpointing", action="store_true", dest="gradient_checkpointing",
                        help="recompute each layer in backward (less activation memory)")
    parser.add_argument("--loss-chunk-size", type=int, default=TRAIN_DEFAULTS["loss_chunk_size"],
                        dest="loss_chunk_size",
                        help="tokens per lm_head + loss chunk, as TrainConfig.loss_chunk_size; 0 = "
                             "full (B, T, V) logits")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the weights and activations")
    parser.add_argument("--objective", default="sft", choices=("sft", "dpo"),
                        help="sft, or dpo (--batch-size counts preference pairs: 2x the sequences, "
                             "plus the reference forward; a frozen copy for full)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the job (memory is per GPU)")
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default=None,
                        help="how the GPUs share the model (default fsdp when --gpus > 1)")
    parser.add_argument("--cpu-offload", action="store_true", dest="cpu_offload",
                        help="FSDP: sharded parameters, gradients and optimizer states in host memory")
    parser.add_argument("--host-memory", default="128GiB", dest="host_memory",
                        help="host memory of the machine, for CPU offload (default 128GiB)")
    parser.add_argument("--reserve", default="1GiB",
                        help="memory kept free for the CUDA context and allocator slack")


def run_plan(args, parser) -> int:
    """Run ``minift plan`` for parsed `args`; errors go through `parser.error` (exit code 2)."""
    try:
        gpu = parse_memory(args.gpu_memory, "--gpu-memory")
        reserve = parse_memory(args.reserve, "--reserve", allow_zero=True)
        host = parse_memory(args.host_memory, "--host-memory")
        if args.cpu_offload and args.parallel == "ddp":
            raise ValueError("--cpu-offload: applies to --parallel fsdp only")
        if args.loss_chunk_size < 0:
            raise ValueError(f"--loss-chunk-size must be >= 0 (0 = full logits), got {args.loss_chunk_size}")
        for name in ("batch_size", "seq_len", "r", "gpus"):
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
                      dtype=dtype, reserve=reserve, objective=args.objective, gpus=args.gpus,
                      parallel=args.parallel, cpu_offload=args.cpu_offload, host_memory=host,
                      loss_chunk_size=args.loss_chunk_size or None)
    except (ValueError, FileNotFoundError, TypeError) as err:
        parser.error(str(err))
    print(format_plan(result, model_name=name, gpu_memory=gpu, reserve=reserve,
                      batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                      r=args.r, gradient_checkpointing=args.gradient_checkpointing))
    return 0


# ---- the memory features -------------------------------------------------------------------
# What the planner turns on, one step at a time, until a method fits (gradient checkpointing is
# on throughout). Each rung keeps the ones before it.
LADDER = (
    ("chunked loss (loss_chunk_size=1024)", dict(loss_chunk_size=1024)),
    ("activation offload", dict(activation_offload=True)),
    ("smaller loss chunks (256) and MLP tiles of 1024 tokens",
     dict(loss_chunk_size=256, mlp_tile_size=1024)),
    ("paged 8-bit AdamW, nothing resident (paged_device_budget=0)",
     dict(optimizer="paged_adamw8bit", paged_device_budget=0)),
    ("optimizer step in backward (max_grad_norm=None, grad_accum=1)",
     dict(optimizer_in_backward=True)),
)
LONGEST_LIMIT = 1 << 22  # 4M tokens: the search's upper bound


def plan_features(cfg: ModelConfig, budget: int, method: str, batch_size: int, seq_len: int,
                  estimator=estimate_memory, wanted_chunk=None, **common) -> dict:
    """The fewest memory features with which `method` fits `budget` device bytes: the user's
    settings first, then gradient checkpointing, then the rungs of `LADDER` one at a time.

    Returns {"fits", "features" (names of what was turned on), "settings" (estimator keywords,
    gradient checkpointing included), "estimate", "longest_seq_batch_1"}; `common` holds r,
    optimizer, dtype, loss_chunk_size, gradient_checkpointing ...; `wanted_chunk` is the loss
    chunk the user asked for, turned on with gradient checkpointing.
    """
    settings, used = dict(common), []
    settings.setdefault("gradient_checkpointing", False)
    est = _feature_estimate(cfg, method, batch_size, seq_len, settings, estimator)
    checkpointing = dict(gradient_checkpointing=True, loss_chunk_size=wanted_chunk)
    rungs = LADDER if settings["gradient_checkpointing"] else \
        (("gradient checkpointing" + (f" (loss_chunk_size={wanted_chunk})" if wanted_chunk else ""),
          checkpointing),) + LADDER
    for name, change in rungs:
        if est.total <= budget:
            break
        if all(settings.get(k) == v for k, v in change.items()):
            continue  # already on (the user's loss_chunk_size=1024, say)
        settings.update(change)
        used.append(name)
        est = _feature_estimate(cfg, method, batch_size, seq_len, settings, estimator)
    full_set = dict(settings, gradient_checkpointing=True)
    for _, change in LADDER:
        full_set.update(change)
    return {"fits": est.total <= budget, "features": used, "settings": settings, "estimate": est,
            "longest_seq_batch_1": longest_seq(cfg, budget, method, estimator=estimator, **full_set)}


def _feature_estimate(cfg, method, batch_size, seq_len, settings, estimator=estimate_memory):
    # rows without padding (the fused causal attention; packed rows are the same size)
    return estimator(cfg, method, batch_size, seq_len, attention_mask=False, **settings)


def train_config_text(method: str, settings: dict) -> str:
    """The TrainConfig(...) that runs `method` with planner `settings` (fields that differ from
    TrainConfig's defaults; the optimizer step in backward needs max_grad_norm=None)."""
    fields = {"method": method}
    for key in ("optimizer", "gradient_checkpointing", "loss_chunk_size", "activation_offload",
                "mlp_tile_size", "paged_device_budget", "optimizer_in_backward"):
        if key in settings and settings[key] != TRAIN_DEFAULTS[key]:
            fields[key] = settings[key]
    if fields.get("optimizer") != "paged_adamw8bit":
        fields.pop("paged_device_budget", None)
    if fields.get("optimizer_in_backward"):
        fields["max_grad_norm"] = None
    return "TrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def longest_seq(cfg: ModelConfig, budget: int, method: str, estimator=estimate_memory, **settings) -> int:
    """Longest sequence at batch 1 whose estimate fits `budget` (0 if none), memory only: the
    search goes past max_position_embeddings (the caller says when the answer is beyond it)."""
    roomy = dataclasses.replace(cfg, max_position_embeddings=LONGEST_LIMIT)

    def fits(t):
        return _feature_estimate(roomy, method, 1, t, settings, estimator).total <= budget

    if not fits(2):
        return 0
    good, bad = 2, LONGEST_LIMIT + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def format_feature_plan(results: dict, budget: int, max_pos: int, fmt) -> str:
    """Lines for ``python -m minift plan``: per method, the features needed, device and host
    (``fmt`` writes a byte count)."""
    lines = ["", "With the memory features (gradient checkpointing on), per method:"]
    for method, res in results.items():
        est = res["estimate"]
        what = ", ".join(res["features"]) or "none needed"
        status = "fits" if res["fits"] else "does not fit even with every feature"
        longest = res["longest_seq_batch_1"]
        beyond = f" (beyond max_position_embeddings {max_pos})" if longest > max_pos else ""
        lines.append(f"- {method}: {status} with {what}: device {fmt(est.total)} of "
                     f"{fmt(budget)}, host RAM {fmt(est.host)}; longest sequence at batch 1 "
                     f"with every feature: {longest}{beyond}")
    return "\n".join(lines)
