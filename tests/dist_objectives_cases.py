"""The cases tests/test_dist_objectives.py runs on 2 gloo processes (``worker``) and on one.

The sharded SFT evaluation (FSDP full, DDP LoRA) with its forwards counted; a DPO reference copy
laid out for FSDP; ``minift.train`` with ``objective="dpo"``: LoRA under FSDP (adapters-off
reference, pairs split between the ranks, a blank pair, a checkpoint and an exact resume), QLoRA
under FSDP, full fine-tuning under DDP (a replicated frozen copy) and under FSDP with precomputed
reference log-probs scored by both ranks; ``objective="grpo"``: LoRA under FSDP (whole prompt
micro-batches per rank, a checkpoint and an exact resume), full fine-tuning with its KL copy under
the default parallel, and LoRA under DDP with prompts that do not divide between the ranks. Every
rank writes its results to ``rank<r>.json``; the GRPO runs' final trainable weights go to
``grpo-<name>-w<world>.safetensors`` (rank 0).
"""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import dist_cases
import torch
import torch.distributed as dist
from dist_cases import WORLD, join
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import minift
from minift.distributed import parallel as mdist
from minift.distributed.run import DistRun
from minift.models.config import ModelConfig
from minift.objectives import grpo
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


# ---- GRPO ------------------------------------------------------------------------------------
# name -> (parallel, method, TrainConfig fields). fsdp-lora and full: 8 prompts, 2 micro-batches of 2
# a step, one per rank: the 1-process rollouts exactly. full: parallel None, FSDP by default on 2
# processes, its KL reference a sharded frozen copy. ddp-uneven: 7 prompts in micro-batches of 3, one
# a step: 2 + 1 prompts per rank, then the epoch's last prompt and a blank batch on rank 1.
GRPO_CASES = {
    "fsdp-lora": ("fsdp", "lora", dict(micro_batch_size=2, grad_accum=2, max_steps=3, save_interval=2)),
    "full": (None, "full", dict(micro_batch_size=2, grad_accum=2, max_steps=2, learning_rate=1e-3)),
    "ddp-uneven": ("ddp", "lora", dict(micro_batch_size=3, grad_accum=1, max_steps=3)),
}
GRPO_PROMPTS = {"fsdp-lora": 8, "full": 8, "ddp-uneven": 7}
GRPO_RESUMED = "fsdp-lora"  # resumed from its step-2 checkpoint on 2 processes
TARGETS = (3, 4, 5, 6)  # rewarded tokens: a quarter of the vocabulary, so most groups' rewards differ
# half the vocabulary ends a completion: a batch's rows have mostly all ended before
# grpo_max_new_tokens, at a step that differs between the ranks' batches, so decoding must stop on
# all ranks together (``waited`` counts the tokens a rank decoded for the other's rows)
GRPO_EOS = [2, 7, 8, 9, 10, 11, 12, 13]


def grpo_model(method):
    """A 2-layer model of 16 tokens; LoRA on every linear, the head too, adapters fresh (zero)."""
    torch.manual_seed(0)
    model = minift.Llama(ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=GRPO_EOS))
    return minift.lora_wrap(model, r=4, alpha=8, exclude=()) if method == "lora" else model


def prompts(n):
    """Prompt rows of token ids, 1 to 3 tokens long (left padding in every batch)."""
    return [{"input_ids": [3 + i % 7, 4, 6 + i % 5][:1 + i % 3]} for i in range(n)]


def share_of_targets(prompts, completions, rows):
    """A rule reward on token ids: the share of a completion's tokens that are TARGETS."""
    return [sum(t in TARGETS for t in c) / max(len(c), 1) for c in completions]


def grpo_config(out: Path, name, world, **kw):
    parallel, method, fields = GRPO_CASES[name]
    base = dict(method=method, objective="grpo", learning_rate=3e-2, bf16=False, seed=0, warmup_ratio=0.0,
                lr_scheduler="constant", device="cpu", progress=False, keep_last=None, grpo_group_size=4,
                grpo_max_new_tokens=6, loss_chunk_size=5, output_dir=str(out / f"grpo-{name}-w{world}"),
                parallel=parallel if world > 1 else None)
    return TrainConfig(**base | fields | kw)


def trained_weights(model) -> dict:
    """The trainable parameters, whole (an FSDP shard gathered: every rank must call it)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def run_grpo(out: Path, name, world, rank, tag="", **kw):
    """minift.train(objective="grpo") evaluated on 5 prompts (3 batches of 2: rank 1 rolls out one
    and a blank one); the metrics lines (rank 0) and the policy's forwards. Rank 0 writes the
    final weights to ``<output_dir><tag>.safetensors``."""
    _, method, _ = GRPO_CASES[name]
    config = grpo_config(out, name, world, **kw)
    model = grpo_model(method)
    forwards, waited = [], []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    ranks_ended = grpo.ranks_ended

    def counted(shard):  # the decisions of the stop rule, recorded
        decide = ranks_ended(shard)

        def stop(ended):
            together = decide(ended)
            waited.append(bool(ended) and not together)  # this rank's rows had ended, another's not
            return together
        return stop

    grpo.ranks_ended = counted
    try:
        summary = minift.train(model, prompts(GRPO_PROMPTS[name]), config, eval_data=prompts(5),
                               reward_fn=share_of_targets)
    finally:
        grpo.ranks_ended, _ = ranks_ended, hook.remove()
    weights = trained_weights(model)
    if rank == 0:
        save_file(weights, config.output_dir + tag + ".safetensors")
    lines = metrics(Path(config.output_dir)) if rank == 0 else None
    return {"summary": summary, "lines": lines, "forwards": len(forwards), "waited": sum(waited)}


def resume_grpo(out: Path, name, world, rank):
    config = grpo_config(out, name, world)
    result = run_grpo(out, name, world, rank, "-resumed", resume_from=str(Path(config.output_dir) / "step-2"))
    return {k: result[k] for k in ("summary", "lines")}


def worker(rank, port, out):
    join(rank, port, WORLD)
    out = Path(out)
    try:
        results = {"rank": mdist.rank(), "world": mdist.world_size(),
                   "sft_eval": {name: sft_eval(*case, WORLD, rank) for name, case in SFT_EVAL.items()},
                   "reference": sharded_reference(out, WORLD)}
        results["dpo"] = {name: run_dpo(out, name, WORLD, rank) for name in DPO_CASES}
        results["resumed"] = resume_dpo(out, RESUMED, WORLD, rank)
        results["grpo"] = {name: run_grpo(out, name, WORLD, rank) for name in GRPO_CASES}
        results["grpo_resumed"] = resume_grpo(out, GRPO_RESUMED, WORLD, rank)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
