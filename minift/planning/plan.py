"""Will it fit? The planner behind ``python -m minift plan``.

For a model (preset name or a checkpoint directory with config.json) and a GPU's memory it traces
one training step of full fine-tuning, LoRA and QLoRA (`minift.estimate_memory`: the real step on
fake tensors, on the CUDA code path), first as asked, then with the memory features turned on one
rung at a time (`LADDER`) until the method fits. For each method it prints the cheapest setting
that fits as the exact ``TrainConfig(...)`` and the ``examples/train_llama.py`` flags that run it,
and recommends the highest-quality method that fits (full > LoRA > QLoRA). With ``--search`` it
also finds, by bisection on traces, the longest sequence at batch 1 and the largest batch at
``--seq-len`` of that setting.

Every default is TrainConfig's. Memory sizes are read by `minift.sizes.parse_bytes`: "24GB" is
24e9 bytes, "24GiB" and "24G" are 24 * 2^30.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from minift.memory.report import CATEGORIES, breakdown_table
from minift.models.config import PRESETS, ModelConfig
from minift.names import METHODS, OPTIMIZERS
from minift.planning.estimate import config_text, estimate_memory
from minift.sizes import fmt_in, format_bytes, parse_bytes, unit_for
from minift.training.config import TrainConfig

LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
DEFAULTS = TrainConfig()  # every default of the plan is the training loop's
parse_memory = parse_bytes


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step up the ladder: what it turns on, as TrainConfig fields and model preparation."""

    name: str
    fields: dict
    prep: dict = dataclasses.field(default_factory=dict)  # adapter_dtype, lm_head_nf4
    methods: tuple = METHODS


# Turned on one at a time, each keeping those before it, cheapest in speed first: recomputing the
# layers costs ~1/3 more compute; smaller loss chunks and MLP tiles cost launches, not FLOPs; the
# host round trips (offload, paging) cost PCIe time; the last rungs change what is trained. The
# sizes are choices, not measurements: 256-token loss chunks hold (256, V) float32 buffers (125 MiB
# at Llama-3's V = 128,256); 1024-token MLP tiles keep a tile's (1024, intermediate) tensors near a
# layer's (T, hidden) attention tensors at the lengths where tiling starts to matter.
LADDER = (
    Rung("gradient checkpointing", {"gradient_checkpointing": True}),
    Rung("loss chunks of 256 tokens", {"loss_chunk_size": 256}),
    Rung("MLP tiles of 1024 tokens", {"mlp_tile_size": 1024}),
    Rung("activation offload", {"activation_offload": True}),
    Rung("paged 8-bit AdamW, nothing resident", {"optimizer": "paged_adamw8bit", "paged_device_budget": 0}),
    Rung("optimizer step in backward", {"optimizer_in_backward": True, "max_grad_norm": None}),
    Rung("bf16 adapters", {}, {"adapter_dtype": torch.bfloat16}, ("lora", "qlora")),
    Rung("lm_head in NF4", {}, {"lm_head_nf4": True}, ("qlora",)),
)


def resolve_model(model: str) -> tuple[ModelConfig, str]:
    """(config, display name) for a preset name or a directory/file holding a config.json."""
    if os.path.isdir(model) or model.endswith(".json"):
        return ModelConfig.from_json(model), os.path.basename(os.path.normpath(model))
    if os.sep in model or model.startswith("."):
        raise FileNotFoundError(f"--model: no config.json at {model!r} (not a directory)")
    return ModelConfig.from_name(model), model


@dataclasses.dataclass
class Request:
    """What the user asked: the micro-batch, the step's TrainConfig fields, the model's preparation."""

    batch_size: int = 1
    seq_len: int = 2048
    fields: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields that differ
    prep: dict = dataclasses.field(default_factory=dict)  # r, dtype, adapter_dtype, lm_head_nf4, ...
    world_size: int = 1
    padded: bool = False

    def estimate(self, cfg, method, fields=None, prep=None, batch_size=None, seq_len=None):
        fields = dict(self.fields, **(fields or {}))
        prep = dict(self.prep, **(prep or {}))
        if method != "qlora":
            prep.pop("lm_head_nf4", None)
        return estimate_memory(cfg, method, batch_size or self.batch_size, seq_len or self.seq_len,
                               attention_mask=self.padded, world_size=self.world_size, **prep, **fields)


def climb(cfg: ModelConfig, request: Request, method: str, budget: int) -> dict:
    """The method as asked, then rung after rung of `LADDER` until it fits `budget`.

    Returns {"asked": estimate, "fits": bool, "features": [rung names], "fields", "prep",
    "estimate": the last estimate (the cheapest fitting one when "fits")}."""
    fields, prep, used = {}, {}, []
    est = asked = request.estimate(cfg, method)
    for rung in LADDER:
        if est.total <= budget:
            break
        merged = dict(request.fields, **fields)
        if method not in rung.methods or all(merged.get(k, getattr(DEFAULTS, k)) == v
                                             for k, v in rung.fields.items()) and not rung.prep:
            continue  # not for this method, or already on
        if rung.fields.get("optimizer_in_backward") and (request.world_size > 1
                                                         or merged.get("grad_accum", 1) > 1):
            continue  # needs one process and one micro-batch a step
        fields.update(rung.fields)
        prep.update(rung.prep)
        used.append(rung.name)
        est = request.estimate(cfg, method, fields, prep)
    return {"asked": asked, "fits": est.total <= budget, "features": used, "fields": fields,
            "prep": prep, "estimate": est}


def largest(fits, low: int, high: int, step: int = 1) -> int:
    """Largest n in [low, high] (a multiple of ``step`` above low) with fits(n), fits monotone;
    low - 1 if none. Doubling to bracket, then bisection: about 2 log2(high / low) traces."""
    if not fits(low):
        return low - 1
    good, jump = low, step
    while good + jump <= high and fits(good + jump):
        good, jump = good + jump, jump * 2
    bad = min(good + jump, high + step)
    while bad - good > step:
        mid = good + (bad - good) // (2 * step) * step
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def search(cfg: ModelConfig, request: Request, method: str, budget: int, fields: dict, prep: dict,
           seq_step: int = 256, max_seq: int = 1 << 20) -> dict:
    # seq_step: the answer's resolution (a choice); max_seq: the search's ceiling, 1M tokens (a
    # choice, above the longest context any supported model was trained for)
    """Longest sequence at batch 1 (to ``seq_step`` tokens, memory only: it may pass the model's
    max_position_embeddings, which the caller states) and largest batch at the request's seq_len,
    both by bisection on traces of the setting ``fields`` / ``prep``."""
    roomy = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, max_seq))

    def fits_seq(t):
        return request.estimate(roomy, method, fields, prep, batch_size=1, seq_len=t).total <= budget

    def fits_batch(b):
        return request.estimate(cfg, method, fields, prep, batch_size=b).total <= budget

    return {"longest_seq_batch_1": largest(fits_seq, seq_step, max_seq, seq_step),
            "largest_batch": largest(fits_batch, 1, 1 << 12)}  # 4096 rows: the batch search's ceiling


def plan(cfg: ModelConfig, gpu_memory: int, request: Request, *, reserve: int = 2**30,
         do_search: bool = False) -> dict:
    """Each method as asked and its cheapest fitting setting; the recommendation."""
    budget = gpu_memory - reserve
    if budget <= 0:
        raise ValueError(f"--reserve ({format_bytes(reserve)}) leaves nothing of --gpu-memory "
                         f"({format_bytes(gpu_memory)})")
    methods = {}
    for method in METHODS:
        res = climb(cfg, request, method, budget)
        if do_search:
            res.update(search(cfg, request, method, budget, res["fields"], res["prep"]))
        methods[method] = res
    best = next((m for m in METHODS if methods[m]["fits"]), None)
    return {"methods": methods, "recommendation": best, "budget": budget, "gpu_memory": gpu_memory,
            "reserve": reserve, "max_position_embeddings": cfg.max_position_embeddings}


def train_config_of(request: Request, method: str, fields: dict) -> TrainConfig:
    return TrainConfig(method=method, micro_batch_size=request.batch_size, **dict(request.fields, **fields))


def train_llama_flags(request: Request, method: str, fields: dict, prep: dict) -> str:
    """The ``examples/train_llama.py`` command line that trains with this setting."""
    c = train_config_of(request, method, fields)
    p = dict(request.prep, **prep)
    flags = [f"--method {method}", f"--batch-size {request.batch_size}", f"--seq-len {request.seq_len}"]
    if method != "full":
        flags.append(f"--r {p.get('r', 16)}")
    if c.optimizer != "adamw":
        flags.append(f"--optimizer {c.optimizer}")
    if c.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if c.loss_chunk_size != 1024:
        flags.append(f"--loss-chunk-size {c.loss_chunk_size or 0}")
    if c.mlp_tile_size:
        flags.append(f"--mlp-tile-size {c.mlp_tile_size}")
    if c.activation_offload:
        flags.append("--activation-offload")
    if c.optimizer == "paged_adamw8bit" and c.paged_device_budget != DEFAULTS.paged_device_budget:
        budget = "all" if c.paged_device_budget is None else c.paged_device_budget
        flags.append(f"--paged-device-budget {budget}")
    if c.optimizer_in_backward:
        flags.append("--optimizer-in-backward")
    if c.max_grad_norm is None:
        flags.append("--max-grad-norm 0")
    if c.grad_accum != 1:
        flags.append(f"--grad-accum {c.grad_accum}")
    if c.s2_attention:
        flags.append("--s2-attention" + (f" --s2-group-size {c.s2_group_size}" if c.s2_group_size else ""))
    if p.get("adapter_dtype") is torch.bfloat16 and method != "full":
        flags.append("--adapter-dtype bfloat16")
    if p.get("lm_head_nf4") and method == "qlora":
        flags.append("--quantize-lm-head")
    if c.objective == "grpo":  # no example script takes every method and feature for GRPO
        return ("minift.train(model, prompts, config, reward_fn=..., tokenizer=...) with config the "
                "TrainConfig above (examples/train_grpo.py shows the whole run)")
    script = "examples/train_dpo.py" if c.objective == "dpo" else "examples/train_llama.py"
    launch = f"torchrun --nproc_per_node {request.world_size} " if request.world_size > 1 else "python "
    if request.world_size > 1:
        flags.append(f"--parallel {c.parallel or 'fsdp'}")
    return launch + script + " " + " ".join(flags)


def as_json(result: dict, request: Request) -> dict:
    """The plan as plain data (``--json``)."""
    out = {"budget": result["budget"], "gpu_memory": result["gpu_memory"], "reserve": result["reserve"],
           "recommendation": result["recommendation"], "batch_size": request.batch_size,
           "seq_len": request.seq_len, "world_size": request.world_size, "methods": {}}
    for m, res in result["methods"].items():
        entry = {"asked": dict(res["asked"].as_dict(), train_config=res["asked"].settings["train_config"]),
                 "fits": res["fits"], "features": res["features"],
                 "estimate": res["estimate"].as_dict(),
                 "train_config": train_config_text(request, m, res),
                 "command": train_llama_flags(request, m, res["fields"], res["prep"])}
        for key in ("longest_seq_batch_1", "largest_batch"):
            if key in res:
                entry[key] = res[key]
        out["methods"][m] = entry
    return out


def train_config_text(request: Request, method: str, res: dict) -> str:
    text = config_text(train_config_of(request, method, res["fields"]))
    extras = []
    prep = dict(request.prep, **res["prep"])
    if prep.get("adapter_dtype") is torch.bfloat16 and method != "full":
        extras.append("lora_wrap(..., adapter_dtype=torch.bfloat16)")
    if prep.get("lm_head_nf4") and method == "qlora":
        extras.append("quantize_model(model, skip=()) for lm_head")
    return text + ("  with " + " and ".join(extras) if extras else "")


def format_plan(result: dict, request: Request, model_name: str) -> str:
    """The planner's report as printed by ``python -m minift plan``."""
    methods = result["methods"]
    lines = [f"model {model_name} | batch {request.batch_size} x seq {request.seq_len}"
             + (f" | {request.world_size} GPUs, memory per GPU" if request.world_size > 1 else "")
             + " | as asked: "
             + methods["lora"]["asked"].settings["train_config"].replace("lora", "<method>", 1),
             f"GPU memory {format_bytes(result['gpu_memory'])}, minus a reserve of "
             f"{format_bytes(result['reserve'])} for the CUDA context: {format_bytes(result['budget'])} "
             f"usable (compared with the allocated peak; the caching allocator's reserved peak beside it)",
             "", "As asked (each step traced on fake tensors on the CUDA path):"]
    columns = {LABELS[m]: methods[m]["asked"].as_dict() for m in METHODS}
    unit = unit_for(max(c["total"] for c in columns.values()))
    lines.append(breakdown_table(columns, rows=CATEGORIES + ("total", "reserved"), bytes_fmt=fmt_in(unit)))
    lines.append("| host memory | " + " | ".join(format_bytes(c["host"]) for c in columns.values()) + " |")
    lines.append("| fits | " + " | ".join("yes" if methods[m]["asked"].total <= result["budget"] else "no"
                                           for m in METHODS) + " |")
    lines += ["", "The cheapest setting that fits, per method (memory features turned on one at a time):"]
    for m in METHODS:
        res = methods[m]
        est = res["estimate"]
        what = "as asked" if not res["features"] else "with " + ", ".join(res["features"])
        if res["fits"]:
            lines.append(f"- {LABELS[m]} fits {what}: {format_bytes(est.total)} allocated "
                         f"({format_bytes(est.reserved)} reserved) of {format_bytes(result['budget'])}, "
                         f"host {format_bytes(est.host)}; peak at {est.moment}")
            lines.append(f"    {train_config_text(request, m, res)}")
            lines.append(f"    {train_llama_flags(request, m, res['fields'], res['prep'])}")
        else:
            lines.append(f"- {LABELS[m]} does not fit even with every feature: {format_bytes(est.total)} "
                         f"of {format_bytes(result['budget'])} (frozen weights alone "
                         f"{format_bytes(est.frozen_weights)}); peak at {est.moment}")
        if "longest_seq_batch_1" in res:
            longest = res["longest_seq_batch_1"]
            beyond = (f" (beyond max_position_embeddings {result['max_position_embeddings']}: memory only; "
                      f"the model must first be extended, e.g. minift.extend_context(model, {longest}, "
                      f"method=\"yarn\"), which changes no memory)") \
                if longest > result["max_position_embeddings"] else ""
            lines.append(f"    longest sequence at batch 1: {longest if longest > 0 else 'none'}{beyond}; "
                         f"largest batch at seq {request.seq_len}: {max(res['largest_batch'], 0) or 'none'}")
    best = result["recommendation"]
    lines.append("")
    if best:
        lines.append(f"Recommendation: {LABELS[best]}, the highest-quality method that fits "
                     f"batch {request.batch_size} x seq {request.seq_len}.")
    else:
        lines.append("Recommendation: nothing fits even with every memory feature; use more GPUs "
                     "(--gpus N shards the model with FSDP), a shorter --seq-len, a smaller "
                     "--batch-size with --grad-accum, or a smaller model.")
    lines.append("Every figure is a trace of minift's own training step (minift.estimate_memory); "
                 "see docs/memory.md.")
    return "\n".join(lines)


def add_plan_arguments(parser) -> None:
    """The options of ``minift plan``; every default is TrainConfig's."""
    add = parser.add_argument
    add("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a directory with config.json")
    add("--gpu-memory", required=True, dest="gpu_memory",
        help="GPU memory, e.g. 24GB (10^9 bytes), 24GiB or 24G (2^30 bytes), 80000MB")
    add("--seq-len", type=int, default=2048, dest="seq_len", help="tokens per sequence")
    add("--batch-size", type=int, default=1, dest="batch_size", help="sequences (DPO: pairs) per micro-batch")
    add("--r", type=int, default=16, help="LoRA rank")
    add("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
        help="dtype of the weights")
    add("--adapter-dtype", default="float32", choices=("float32", "bfloat16"), dest="adapter_dtype",
        help="dtype of the LoRA weights")
    add("--quantize-lm-head", action="store_true", dest="lm_head_nf4", help="QLoRA: lm_head in NF4 too")
    add("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS, help="TrainConfig.optimizer")
    add("--gradient-checkpointing", action="store_true", dest="gradient_checkpointing",
        help="TrainConfig.gradient_checkpointing")
    add("--loss-chunk-size", type=int, default=DEFAULTS.loss_chunk_size, dest="loss_chunk_size",
        help="TrainConfig.loss_chunk_size (tokens per lm_head + loss chunk); 0 = full logits")
    add("--activation-offload", action="store_true", dest="activation_offload",
        help="TrainConfig.activation_offload (needs --gradient-checkpointing)")
    add("--optimizer-in-backward", action="store_true", dest="optimizer_in_backward",
        help="TrainConfig.optimizer_in_backward (clipping off: max_grad_norm=None)")
    add("--mlp-tile-size", type=int, default=DEFAULTS.mlp_tile_size, dest="mlp_tile_size",
        help="TrainConfig.mlp_tile_size (tokens per MLP tile)")
    add("--paged-device-budget", default=None, dest="paged_device_budget",
        help="TrainConfig.paged_device_budget for paged_adamw8bit: a size (0 = stream every page) "
             "or 'all' (default 1GiB)")
    add("--grad-accum", type=int, default=DEFAULTS.grad_accum, dest="grad_accum",
        help="TrainConfig.grad_accum")
    add("--objective", default=DEFAULTS.objective, choices=("sft", "dpo", "grpo"),
        help="sft; dpo (--batch-size counts pairs; the reference as TrainConfig.dpo_reference); or "
             "grpo (--batch-size counts prompts of --seq-len tokens, each sampled --grpo-group-size "
             "times for --grpo-max-new-tokens tokens; the peak of rollout, scoring and update)")
    add("--grpo-group-size", type=int, default=DEFAULTS.grpo_group_size, dest="grpo_group_size",
        help="TrainConfig.grpo_group_size (completions per prompt, with --objective grpo)")
    add("--grpo-max-new-tokens", type=int, default=DEFAULTS.grpo_max_new_tokens, dest="grpo_max_new_tokens",
        help="TrainConfig.grpo_max_new_tokens (tokens per completion, with --objective grpo)")
    add("--s2-attention", action="store_true", dest="s2_attention",
        help="TrainConfig.s2_attention (shifted sparse attention while training)")
    add("--s2-group-size", type=int, default=DEFAULTS.s2_group_size, dest="s2_group_size",
        help="TrainConfig.s2_group_size (tokens per S²-Attn group; default a quarter of --seq-len)")
    add("--padded", action="store_true", help="batches carry padding (the masked attention path)")
    add("--gpus", type=int, default=1, help="GPUs of a torchrun job (memory is per GPU)")
    add("--parallel", choices=("fsdp", "ddp"), default=None, help="with --gpus > 1 (default fsdp)")
    add("--reserve", default="1GiB", help="memory kept free for the CUDA context and allocator slack")
    add("--search", action="store_true",
        help="also find the longest sequence at batch 1 and the largest batch, by bisection on traces")
    add("--json", action="store_true", help="print the plan as JSON")


def request_of(args) -> Request:
    """The parsed flags as a `Request` (checked by TrainConfig; a bad value is one line)."""
    for name in ("batch_size", "seq_len", "r", "gpus", "grad_accum"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {getattr(args, name)}")
    if args.loss_chunk_size < 0:
        raise ValueError(f"--loss-chunk-size must be >= 0 (0 = full logits), got {args.loss_chunk_size}")
    if args.lm_head_nf4 and args.gpus > 1:
        raise ValueError("--quantize-lm-head: plan it on one GPU")
    budget = args.paged_device_budget
    if budget is not None:
        budget = None if budget.strip().lower() == "all" else \
            parse_bytes(budget, "--paged-device-budget", allow_zero=True)
    fields = dict(optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                  loss_chunk_size=args.loss_chunk_size or None, activation_offload=args.activation_offload,
                  optimizer_in_backward=args.optimizer_in_backward, mlp_tile_size=args.mlp_tile_size,
                  grad_accum=args.grad_accum, objective=args.objective,
                  s2_attention=args.s2_attention, s2_group_size=args.s2_group_size,
                  grpo_group_size=args.grpo_group_size, grpo_max_new_tokens=args.grpo_max_new_tokens)
    if args.objective != "grpo" and (args.grpo_group_size, args.grpo_max_new_tokens) != \
            (DEFAULTS.grpo_group_size, DEFAULTS.grpo_max_new_tokens):
        raise ValueError("--grpo-group-size / --grpo-max-new-tokens apply to --objective grpo")
    if args.objective == "grpo" and args.gpus > 1:
        raise ValueError("--objective grpo: plan one GPU (each rank samples and trains its own prompts)")
    if args.optimizer_in_backward:
        fields["max_grad_norm"] = None
    if args.paged_device_budget is not None:
        fields["paged_device_budget"] = budget
    if args.gpus > 1:
        fields.update(parallel=args.parallel or "fsdp")
    fields = {k: v for k, v in fields.items() if getattr(DEFAULTS, k) != v}
    TrainConfig(method="lora", **fields)  # refuses impossible combinations in one line
    prep = dict(r=args.r, dtype=getattr(torch, args.dtype), adapter_dtype=getattr(torch, args.adapter_dtype))
    if args.lm_head_nf4:
        prep["lm_head_nf4"] = True
    return Request(batch_size=args.batch_size, seq_len=args.seq_len, fields=fields, prep=prep,
                   world_size=args.gpus, padded=args.padded)


def run_plan(args, parser) -> int:
    """Run ``minift plan`` for parsed `args`; errors go through `parser.error` (exit code 2)."""
    try:
        gpu = parse_memory(args.gpu_memory, "--gpu-memory")
        reserve = parse_memory(args.reserve, "--reserve", allow_zero=True)
        request = request_of(args)
        cfg, name = resolve_model(args.model)
        if args.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len} is longer than {name}'s "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        result = plan(cfg, gpu, request, reserve=reserve, do_search=args.search)
    except (ValueError, FileNotFoundError, TypeError) as err:
        parser.error(str(err).splitlines()[0])
    if args.json:
        print(json.dumps(as_json(result, request), indent=1))
    else:
        print(format_plan(result, request, name))
    return 0


def longest_context(cfg: ModelConfig, budget: int, method: str, request: Optional[Request] = None,
                    seq_step: int = 256, max_seq: int = 1 << 20) -> int:
    """The longest sequence at batch 1 whose traced step fits ``budget``, with ``request``'s
    setting (default: every rung of the ladder that applies to ``method``)."""
    request = request or Request()
    fields, prep = {}, {}
    if not request.fields:
        for rung in LADDER:
            if method in rung.methods:
                fields.update(rung.fields)
                prep.update(rung.prep)
    return search(cfg, request, method, budget, fields, prep, seq_step, max_seq)["longest_seq_batch_1"]
