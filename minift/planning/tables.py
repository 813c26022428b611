"""``python -m minift bench memory``: the traced tables of docs/memory.md, written as JSON.

* Llama-3.1-8B and Llama-3-70B (Llama-3.1-70B's shapes), batch 2 x 2048, CUDA path: each method
  with TrainConfig's defaults plus gradient checkpointing, and with the setting that reaches the
  goals of the project (QLoRA <= 6.0 GiB, LoRA <= 15.5 GiB, full <= 17.5 GiB allocated; the best
  published figures are torchtune's 7.4 / 16.2 / 18.9 GiB, measured on an RTX 4090).
* The longest QLoRA context at batch 1 in 24 GB and 80 GB (24e9 and 80e9 bytes, less a 1 GiB
  reserve for the CUDA context), found by interpolation and bisection on traces of the
  long-context setting; the published figures are Unsloth's 78,475 and 342,733 tokens.

Every row names the `TrainConfig` traced; nothing is computed but by tracing the step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from minift.models.config import ModelConfig
from minift.planning.estimate import estimate_memory
from minift.sizes import format_bytes

GIB = 2**30
RESERVE = GIB  # the CUDA context and allocator slack, kept free (the planner's default reserve)

# What the project must beat (published, measured on GPUs by others; see the module docstring)
PUBLISHED = {"torchtune_8b_2x2048_gib": {"qlora": 7.4, "lora": 16.2, "full": 18.9},
             "unsloth_8b_qlora_longest_tokens": {"24GB": 78_475, "80GB": 342_733}}
GOALS_GIB = {"qlora": 6.0, "lora": 15.5, "full": 17.5}

# the step as `minift.train` runs it by default, with gradient checkpointing on
BASELINE = dict(gradient_checkpointing=True)
# the settings that reach the goals at 2 x 2048 (chosen by tracing; every field is a TrainConfig
# field except the two model-preparation ones, adapter_dtype and lm_head_nf4)
LEAN = {
    "qlora": dict(gradient_checkpointing=True, loss_chunk_size=256, activation_offload=True,
                  mlp_tile_size=512, optimizer="paged_adamw8bit", paged_device_budget=0,
                  optimizer_in_backward=True, max_grad_norm=None, adapter_dtype=torch.bfloat16,
                  lm_head_nf4=True),
    "lora": dict(gradient_checkpointing=True, loss_chunk_size=128, activation_offload=True,
                 mlp_tile_size=256, optimizer="paged_adamw8bit", paged_device_budget=0,
                 optimizer_in_backward=True, max_grad_norm=None, adapter_dtype=torch.bfloat16),
    "full": dict(gradient_checkpointing=True, loss_chunk_size=256, activation_offload=True,
                 mlp_tile_size=512, optimizer="paged_adamw8bit", paged_device_budget=0,
                 optimizer_in_backward=True, max_grad_norm=None),
}
# long context: the lean QLoRA setting with larger MLP tiles and loss chunks (fewer pieces per
# step; each tile's (tile, intermediate) tensors are small beside the layer's attention tensors)
LONG = dict(LEAN["qlora"], mlp_tile_size=8192, loss_chunk_size=1024)


def row(preset: str, method: str, settings: dict, batch_size: int = 2, seq_len: int = 2048) -> dict:
    est = estimate_memory(preset, method, batch_size, seq_len, attention_mask=False, **settings)
    return {"model": preset, "method": method, "batch_size": batch_size, "seq_len": seq_len,
            "train_config": est.settings["train_config"],
            "model_preparation": {k: str(v) for k, v in settings.items()
                                  if k in ("adapter_dtype", "lm_head_nf4")},
            **est.as_dict(), "allocated_gib": round(est.total / GIB, 3),
            "reserved_gib": round(est.reserved / GIB, 3), "trace_seconds": est.settings["trace_seconds"]}


def longest(preset: str, budget: int, settings: dict, step: int = 256, start: int = 32768,
            method: str = "qlora", memo: dict = None) -> dict:
    """Largest seq_len (a multiple of ``step``) at batch 1 whose traced allocated peak fits
    ``budget``: double from ``start`` to bracket it, then interpolate between the bracket's traced
    peaks (the peak grows almost linearly with the length) and bisect when that stalls. Returns
    the length, the traced peaks that bracket it and every trace made. ``memo`` (seq_len ->
    trace) shares traces between searches of the same method and settings."""
    cfg = dataclasses.replace(ModelConfig.from_name(preset), max_position_embeddings=1 << 21)
    traces, memo = [], {} if memo is None else memo

    def peak(t):
        if t not in memo:
            est = estimate_memory(cfg, method, 1, t, attention_mask=False, **settings)
            memo[t] = {"seq_len": t, "allocated": est.total, "reserved": est.reserved,
                       "trace_seconds": est.settings["trace_seconds"]}
        traces.append(memo[t])
        return memo[t]["allocated"]

    t = start
    p = peak(t)
    if p <= budget:  # double until one does not fit
        good, good_peak = t, p
        while True:
            t *= 2
            p = peak(t)
            if p > budget:
                bad, bad_peak = t, p
                break
            good, good_peak = t, p
    else:  # halve until one fits
        bad, bad_peak = t, p
        while True:
            t = t // 2 // step * step
            if t < step:
                return {"seq_len": 0, "traces": traces}
            p = peak(t)
            if p <= budget:
                good, good_peak = t, p
                break
            bad, bad_peak = t, p
    while bad - good > step:
        guess = good + int((budget - good_peak) / (bad_peak - good_peak) * (bad - good)) // step * step
        guess = min(max(guess, good + step), bad - step)
        p = peak(guess)
        if p <= budget:
            good, good_peak = guess, p
            if guess + step < bad and peak(guess + step) > budget:  # the boundary, confirmed
                bad, bad_peak = guess + step, traces[-1]["allocated"]
        else:
            bad, bad_peak = guess, p
    return {"seq_len": good, "fits_peak": good_peak, "next_step": bad, "next_step_peak": bad_peak,
            "traces": traces}


def dpo_rows(preset: str = "llama-3.1-8b", seq_len: int = 1024) -> list:
    """SFT (one sequence) vs DPO (one pair) at ``seq_len``, gradient checkpointing on, per method
    and DPO reference: what the RLHF-stage reader asked for, traced."""
    rows = []
    for method, references in (("lora", ("auto",)), ("qlora", ("auto",)), ("full", ("auto", "copy_nf4"))):
        settings = dict(BASELINE, **({"optimizer": "paged_adamw8bit"} if method == "full" else {}))
        rows.append(dict(row(preset, method, settings, 1, seq_len), objective="sft"))
        for ref in references:
            dpo = dict(settings, objective="dpo", dpo_reference=ref)
            rows.append(dict(row(preset, method, dpo, 1, seq_len),
                             objective="dpo", dpo_reference=ref))
    return rows


def run(out: str, models=("llama-3.1-8b", "llama-3-70b"), longest_context: bool = True,
        dpo: bool = True) -> dict:
    started = time.perf_counter()
    result = {"what": "traced memory of minift's training step (fake tensors, CUDA code path); "
                      "allocated = the tracker's peak, reserved = the caching allocator simulated",
              "published": PUBLISHED, "goals_gib": GOALS_GIB, "reserve_bytes": RESERVE,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "code": _commit(), "command": "python -m minift bench memory",
              "tables": {}, "longest_context": {}}
    for preset in models:
        result["tables"][preset] = [row(preset, m, s) for m in ("full", "lora", "qlora")
                                    for s in (BASELINE, LEAN[m])]
        _write(out, result)
    if dpo:
        result["dpo"] = dpo_rows()
        _write(out, result)
    if longest_context:
        for name, card in (("24GB", 24 * 10**9), ("80GB", 80 * 10**9)):
            found = longest("llama-3.1-8b", card - RESERVE, LONG)
            found.update(card_bytes=card, budget_bytes=card - RESERVE,
                         train_config=estimate_memory("llama-3.1-8b", "qlora", 1, 2048,
                                                      attention_mask=False, **LONG).settings["train_config"])
            result["longest_context"][name] = found
            _write(out, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write(out, result)
    return result


def _commit() -> str:
    """The git commit of the source traced (the file's folder), or "unknown"."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write(out: str, result: dict) -> None:
    """Written after every table, so an interrupted run keeps what it has."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)


def summary(result: dict) -> str:
    lines = []
    for preset, rows in result["tables"].items():
        lines.append(f"{preset}, batch 2 x 2048, CUDA path (traced):")
        for r in rows:
            lines.append(f"  {r['method']:5s} {format_bytes(r['total']):>10} allocated, "
                         f"{format_bytes(r['reserved']):>10} reserved  {r['train_config']}"
                         f"{' ' + str(r['model_preparation']) if r['model_preparation'] else ''}")
    for name, found in result["longest_context"].items():
        lines.append(f"longest QLoRA context at batch 1 in {name}: {found['seq_len']} tokens")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minift.planning.tables",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/traced_memory.json", help="JSON result file")
    parser.add_argument("--models", default="llama-3.1-8b,llama-3-70b", help="comma-separated presets")
    parser.add_argument("--no-longest", action="store_true", help="skip the longest-context search")
    parser.add_argument("--no-dpo", action="store_true", help="skip the SFT vs DPO table")
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    result = run(args.out, models, not args.no_longest, not args.no_dpo)
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
