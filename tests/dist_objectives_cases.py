"""The cases tests/test_dist_objectives.py runs on 2 gloo processes (``worker``) and on one.

The sharded SFT evaluation (FSDP full, DDP LoRA) with its forwards counted; a DPO reference copy
laid out for FSDP; ``minift.train`` with ``objective="dpo"``: LoRA under FSDP (adapters-off
reference, pairs split between the ranks, a blank pair, a checkpoint and an exact resume), QLoRA
under FSDP, full fine-tuning under DDP (a replicated frozen copy) and under FSDP with precomputed
reference log-probs scored by both ranks. Every rank writes its results to ``rank<r>.json``.
"""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import dist_cases
import torch
import torch.distributed as dist
from dist_cases import WORLD, join
from torch.distributed.tensor import DTensor

import minift
from minift.distributed import parallel as mdist
from minift.distributed.run import DistRun
from minift.objectives.dpo import ModelReference, objective_for
from minift.objectives.sft import evaluate
from minift.training.config import TrainConfig

# name -> (parallel, method, TrainConfig fields). fsdp-lora: micro-batches of 3 pairs, one per
# step, split 2 + 1 between the ranks; 10 pairs make the epoch's last micro-batch 1 pair, so rank 1
# runs a blank pair in that step; 7 eval pairs are 3 batches, so rank 1 evaluates one blank batch.
# fsdp-qlora and ddp-full: 2 micro-batches of 2 pairs per step, one per rank (ddp-full: a frozen
# copy on each rank). fsdp-full-pre: the reference log-probs are precomputed (by both ranks) and
# read from the batches.
DPO_CASES = {
    "fsdp-lora": ("fsdp", "lora", dict(micro_batch_size=3, grad_accum=1, max_steps=4, save_interval=2)),
    "fsdp-qlora": ("fsdp", "qlora", dict(micro_batch_size=2, grad_accum=2, max_steps=2)),
    "ddp-full": ("ddp", "full", dict(micro_batch_size=2, grad_accum=2, max_steps=3, learning_rate=1e-3)),
    "fsdp-full-pre": ("fsdp", "full", dict(micro_batch_size=2, grad_accum=1, max_steps=3, learning_rate=1e-3,
                                            precompute_reference=True)),
}
RESUMED = "fsdp-lora"  # resumed from its step-2 checkpoint on 2 processes


def pairs(n, seed=0, vocab=256):
    """Preference pairs of various lengths sharing their prompt; replies scored, prompts not."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(3 + i % 3)]
        pair = {}
        for half, length in (("chosen", 2 + i % 4), ("rejected", 3 + (i * 2) % 3)):
            reply = [rng.randrange(3, vocab) for _ in range(length)]
            pair[f"{half}_ids"], pair[f"{half}_labels"] = prompt + reply, [-100] * len(prompt) + reply
        out.append(pair)
    return out


def examples(n=11, seed=1):
    """SFT examples: 11 in batches of 2 are 6 eval batches, the last of one row."""
    return dist_cases.examples(n, seed)


def make_model(method):
    return dist_cases.make_model(method, fresh=True)  # fresh adapters: step 1's policy is the reference


# ---- SFT evaluation ------------------------------------------------------------------------
SFT_EVAL = {"fsdp-full": ("fsdp", "full"), "ddp-lora": ("ddp", "lora")}


def eval_config():
    # the chunked loss, as in training: FSDP's root stays gathered after the forward for it
    return TrainConfig(micro_batch_size=2, bf16=False, device="cpu", progress=False, loss_chunk_size=5)


def sft_eval(parallel, method, world, rank):
    """``evaluate`` of the tiny model on ``examples()``; with world > 1, sharded; forwards counted."""
    model = make_model(method)
    if method != "full":
        with torch.no_grad():  # adapters that change the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    shard = None
    if world > 1:
        model = mdist.apply_parallel(model, SimpleNamespace(parallel=parallel, bf16=False), device=torch.device("cpu"))
        shard = mdist.Shard(rank, world, "cpu")
    inner = mdist.unwrap(model)
    forwards = []
    hook = inner.register_forward_pre_hook(lambda module, args: forwards.append(1))
    result = evaluate(model, examples(), eval_config(), "cpu", shard=shard)
    hook.remove()
    return dict(result, forwards=len(forwards))


# ---- DPO -------------------------------------------------------------------------------------
def dpo_config(out: Path, name, world, **kw):
    parallel, method, fields = DPO_CASES[name]
    base = dict(method=method, objective="dpo", dpo_beta=0.5, learning_rate=1e-2, bf16=False, seed=0,
                warmup_ratio=0.0, lr_scheduler="constant", device="cpu", progress=False, keep_last=None,
                output_dir=str(out / f"dpo-{name}-w{world}"), parallel=parallel if world > 1 else None)
    return TrainConfig(**base | fields | kw)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_dpo(out: Path, name, world, rank):
    """minift.train(objective="dpo") on 10 pairs, evaluated on 7; the metrics lines (rank 0)."""
    _, method, _ = DPO_CASES[name]
    config = dpo_config(out, name, world)
    summary = minift.train(make_model(method), pairs(10), config, eval_data=pairs(7, seed=1))
    lines = metrics(Path(config.output_dir)) if rank == 0 else None
    return {"summary": summary, "lines": lines}


def resume_dpo(out: Path, name, world, rank):
    _, method, _ = DPO_CASES[name]
    config = dpo_config(out, name, world)
    config = dpo_config(out, name, world, resume_from=str(Path(config.output_dir) / "step-2"))
    summary = minift.train(make_model(method), pairs(10), config, eval_data=pairs(7, seed=1))
    return {"summary": summary, "lines": metrics(Path(config.output_dir)) if rank == 0 else None}


def sharded_reference(out: Path, world):
    """objective_for + DistRun.place_frozen under FSDP full: the frozen copy's parameters."""
    config = dpo_config(out, "fsdp-full-pre", world, precompute_reference=False)
    run = DistRun(config)
    model = make_model("full")
    objective = objective_for(model, config, pairs(4))
    model = run.prepare(model, run.device)
    objective.distribute(run.shard, run.place_frozen)
    ref = objective.reference
    params = list(ref.model.parameters())
    return {"kind": type(ref).__name__, "placed": isinstance(ref, ModelReference) and ref.placed,
            "dtensor": all(isinstance(p, DTensor) for p in params),
            "trainable": sum(p.requires_grad for p in params),
            "local": sum(p.to_local().numel() for p in params if isinstance(p, DTensor)),
            "full": sum(p.numel() for p in params),
            "separate": not any(p is q for p in params for q in model.parameters())}


def worker(rank, port, out):
    join(rank, port, WORLD)
    out = Path(out)
    try:
        results = {"rank": mdist.rank(), "world": mdist.world_size(),
                   "sft_eval": {name: sft_eval(*case, WORLD, rank) for name, case in SFT_EVAL.items()},
                   "reference": sharded_reference(out, WORLD)}
        results["dpo"] = {name: run_dpo(out, name, WORLD, rank) for name in DPO_CASES}
        results["resumed"] = resume_dpo(out, RESUMED, WORLD, rank)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
