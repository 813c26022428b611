"""Per-rank memory of an FSDP step, measured with MemoryTracker, against the per-GPU estimate.

Full fine-tuning, LoRA and QLoRA of a small bf16 Llama, one micro-batch per rank, run on one
process and on N gloo processes (FSDP2, minift.distributed.parallel.apply_parallel). Each process tracks
its second step (the first creates the optimizer states) and reports its own tensors: sharded
parameters, gradients and states are its local shards; the layers FSDP gathers for the forward
and backward are created during the step, so the tracker files them under activations (kept for
backward) or other, not under weights. The totals are what compare with
``estimate_memory(..., world_size=N, parallel="fsdp")``.

Usage: python examples/fsdp_memory.py --nproc 2 --out docs/benchmarks/fsdp_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.distributed import parallel as mdist
from minift.distributed.settled_gloo import init_settled_gloo
from minift.files import write_json
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.objectives.sft import _batch_loss_sum, trained_tokens

CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
METHODS = ("full", "lora", "qlora")
SEQ, R = 128, 8
KEYS = ("frozen_weights", "trainable_params", "gradients", "optimizer_states", "activations", "other", "peak")


def measure(method: str, world: int, rank: int) -> dict:
    """The tracked breakdown of this rank's second step."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(**CONFIG)).to(torch.bfloat16)
    if method == "qlora":
        minift.quantize_model(model)
    if method != "full":
        model.requires_grad_(False)
        minift.lora_wrap(model, r=R, alpha=2 * R)
    if world > 1:
        model = mdist.apply_parallel(model, SimpleNamespace(parallel="fsdp"), device=torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(rank))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    cpu = torch.device("cpu")
    for _ in range(2):
        tracker = MemoryTracker(model, opt)
        with tracker.track():
            mdist.accumulate_over_ranks(model, [batch], cpu, lambda m, b, d: _batch_loss_sum(m, b, d, False),
                                       trained_tokens)
            opt.step()
            opt.zero_grad(set_to_none=True)
    report = tracker.report().as_dict()
    return {k: report[k] for k in KEYS}


def _worker(rank: int, port: int, world: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # measured ranks: every collective frees its buffers where the step does, not later on gloo's
    # worker thread (see minift/distributed/settled_gloo.py); init_from_env then finds the group
    init_settled_gloo(rank, world)
    mdist.init_from_env("cpu")
    try:
        result = {m: measure(m, world, rank) for m in METHODS}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(nproc: int) -> dict:
    """Tracked and estimated bytes per method, on 1 process and per rank of ``nproc``."""
    torch.set_num_threads(1)
    one = {m: measure(m, 1, 0) for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(mdist.free_port(), nproc, tmp), nprocs=nproc, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]
    cfg = ModelConfig(**CONFIG)
    cases = {}
    # the step measure() runs: unpadded rows, no autocast, the full logits, no clipping
    step = dict(r=R, device="cpu", attention_mask=False, bf16=False, loss_chunk_size=None, max_grad_norm=None)
    for m in METHODS:
        est1 = minift.estimate_memory(cfg, m, 1, SEQ, **step)
        estn = minift.estimate_memory(cfg, m, 1, SEQ, world_size=nproc, parallel="fsdp", **step)
        peaks = [r[m]["peak"] for r in ranks]
        cases[m] = {"one_process": one[m], "ranks": [r[m] for r in ranks],
                    "estimate_one": est1.as_dict(), "estimate_per_gpu": estn.as_dict(),
                    "estimate_over_tracked_one": est1.total / one[m]["peak"],
                    "estimate_over_tracked_per_rank": [estn.total / p for p in peaks]}
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cases = run(args.nproc)
    for m, c in cases.items():
        ratios = ", ".join(f"{x:.3f}" for x in c["estimate_over_tracked_per_rank"])
        peaks = ", ".join(f"{r['peak']:,}" for r in c["ranks"])
        print(f"{m}: tracked peak 1 process {c['one_process']['peak']:,} B, per rank {peaks} B; "
              f"estimate / tracked: 1 process {c['estimate_over_tracked_one']:.3f}, per rank {ratios}")
    write_json(args.out, {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
                          "command": "python examples/fsdp_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                          "config": CONFIG, "seq_len": SEQ, "r": R, "nproc": args.nproc, "cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
