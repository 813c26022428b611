"""The cases tests/test_distributed.py runs on 2 gloo processes (``worker``) and on one.

FSDP2 full / LoRA / QLoRA and DDP LoRA for 3 optimizer steps with a sharded checkpoint after
step 2 and a resume from it, the consolidated exports, ``minift.train`` under torchrun-like
environment variables, and the NF4 all-gather (bit equality and bytes on the wire). Every rank
writes its results to ``rank<r>.json``.
"""
import dataclasses
import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
from torch.distributed.tensor import distribute_tensor

import minift
from minift.distributed import checkpoint as dckpt
from minift.distributed import parallel as mdist
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.fsdp import ShardedNF4Linear, shardable_nf4
from minift.nf4.linear import NF4Linear
from minift.objectives.loss import token_loss_sum
from minift.objectives.sft import trained_tokens
from minift.optim import AdamW8bit
from minift.training.config import TrainConfig
from minift.training.schedule import step_groups

WORLD = 2
STEPS = 3
# (parallel, method, grad_accum): grad_accum 2 hands whole micro-batches to the ranks; 1 splits
# each micro-batch (3 rows) by rows, 2 + 1.
CASES = [("fsdp", "full", 2), ("fsdp", "lora", 2), ("fsdp", "qlora", 2), ("ddp", "lora", 1)]
# FSDP LoRA runs with CPUOffloadPolicy (unpinned on CPU): the offload code path, checkpoints included
OFFLOADED = ("fsdp", "lora")
# Same samples, same math, another summation order (per-rank partial sums, then an all-reduce):
# measured differences on this CPU stay below 1e-6 relative; 1e-5 leaves room across CPUs.
LOSS_RTOL = 1e-5


def case_name(parallel, method, accum):
    return f"{parallel}-{method}-a{accum}"


def examples(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 14)
        ids = [rng.randrange(3, 256) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def step_config(accum):
    return TrainConfig(micro_batch_size=3 if accum == 1 else 2, grad_accum=accum, bf16=False, seed=0,
                       progress=False, device="cpu")


def make_model(method, fresh=False):
    """The tiny model for ``method``; LoRA B is drawn non-zero (so the adapters change the output
    from step 1) unless ``fresh`` (zero adapters: DPO's step-1 policy is its reference)."""
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny"))
    if method == "qlora":
        minift.quantize_model(model)
    if method != "full":
        minift.lora_wrap(model, r=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name and not fresh:
                    p.normal_(std=0.02)
    return model


def join(rank, port, world, init=True):
    """In a spawned worker: the variables a torchrun launch sets, one thread, and (``init``) the
    gloo group; without it ``minift.train`` joins the group itself."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if init:
        mdist.init_from_env("cpu")


def loss_sum(model, batch, device):
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return token_loss_sum(model(**inputs), batch["labels"].to(device))


def prepared(parallel, method, world):
    model = make_model(method)
    if world > 1:
        config = SimpleNamespace(parallel=parallel, bf16=False, fsdp_cpu_offload=(parallel, method) == OFFLOADED)
        model = mdist.apply_parallel(model, config, device=torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-2)


def run_steps(model, params, optimizer, accum, world, rank, first, last):
    """Run optimizer steps first..last (1-based) of the fixed data order; their losses and norms."""
    groups = step_groups(examples(), step_config(accum))
    out = []
    for step in range(1, last + 1):
        group = next(groups)[2]
        if step < first:
            continue
        local = mdist.shard_group(group, rank, world)
        loss, n = mdist.accumulate_over_ranks(model, local, "cpu", loss_sum, trained_tokens)
        norm = mdist.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append({"loss": float(loss), "norm": norm, "tokens": n})
    return out


def run_case(out: Path, parallel, method, accum, world, rank):
    """Steps 1-3 with a sharded checkpoint after 2, then a fresh model resumed from it for step 3."""
    name = case_name(parallel, method, accum)
    trainable_only = method != "full"
    model, params, opt = prepared(parallel, method, world)
    result = {"steps": run_steps(model, params, opt, accum, world, rank, 1, 2)}
    dckpt.save_sharded(out / f"{name}-ckpt", model, opt, trainable_only=trainable_only)
    result["steps"] += run_steps(model, params, opt, accum, world, rank, 3, 3)
    if method == "full":
        dckpt.export_model(model, out / f"{name}-export", ModelConfig.from_name("tiny"))
    else:
        dckpt.export_adapter(model, out / f"{name}-export")
    model, params, opt = prepared(parallel, method, world)
    dckpt.load_sharded(out / f"{name}-ckpt", model, opt, trainable_only=trainable_only)
    result["resumed"] = run_steps(model, params, opt, accum, world, rank, 3, 3)
    return result


class CountingAllGather(DefaultAllGather):
    """FSDP2's all-gather, recording the bytes each call sends (this rank's input) and receives."""

    def __init__(self):
        self.calls = []

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.calls.append({"sent": input_tensor.numel() * input_tensor.element_size(),
                           "received": output_tensor.numel() * output_tensor.element_size(),
                           "dtype": str(input_tensor.dtype)})
        return super().__call__(output_tensor, input_tensor, group, async_op)


def padded_bytes(params, world):
    """What FSDP2 gathers for these parameters: each padded to a multiple of world on dim 0."""
    return sum(math.ceil(p.shape[0] / world) * world * (p.numel() // p.shape[0]) * p.element_size()
               for p in params)


def nf4_gather(world):
    """One NF4 layer sharded and gathered: bit equality with the unsharded layer, bytes counted."""
    torch.manual_seed(1)
    result = {}
    for double_quant in (True, False):
        layer = NF4Linear.from_weight(torch.randn(96, 80), blocksize=64, double_quant=double_quant)
        want = {str(dt): layer.dequantize(dt) for dt in (torch.float32, torch.bfloat16)}
        holder = nn.Sequential(layer)
        shardable_nf4(holder)
        full_bytes = holder[0].nf4_bytes.numel()
        fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))
        counter = CountingAllGather()
        holder.set_custom_all_gather(counter)
        holder.unshard()
        got = {dt: holder[0].dequantize(getattr(torch, dt.split(".")[1])) for dt in want}
        holder.reshard()
        result[f"dq{int(double_quant)}"] = {
            "equal": all(torch.equal(got[dt], want[dt]) for dt in want), "calls": counter.calls,
            "nf4_bytes": full_bytes, "local_bytes": holder[0].nf4_bytes.to_local().numel()}
    return result


def qlora_layer_gather(world):
    """The all-gather of one QLoRA decoder layer in a forward: bytes vs its parameters' sizes."""
    model, _, _ = prepared("fsdp", "qlora", world)
    layer = model.model.layers[0]
    counter = CountingAllGather()
    layer.set_custom_all_gather(counter)
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 6)))
    params = [p.to_local() for p in layer.parameters()]
    return {"calls": counter.calls, "expected": padded_bytes([p for p in layer.parameters()], world),
            "nf4_bytes": sum(p.numel() for n, p in layer.named_parameters() if n.endswith("nf4_bytes")),
            "base_numel": sum(m.in_features * m.out_features for m in layer.modules()
                              if isinstance(m, ShardedNF4Linear)),
            "local_numel": sum(p.numel() for p in params)}


# ---- the 8-bit optimizer on shards -------------------------------------------------------
# Rows of 256 elements (hidden 256): every projection, the embedding and lm_head keep 8-bit
# moments under FSDP too; vocabulary 251 splits the embedding's rows unevenly (126 + 125).
ALIGNED = dict(vocab_size=251, hidden_size=256, intermediate_size=512)
# (paged, parameter dtype, stochastic rounding); the paged case also runs FSDP's CPU offload path
OPTIM8_CASES = [(False, "float32", False), (True, "bfloat16", True)]
OPTIM8_STEPS = 3


def optim8_name(paged, dtype, stochastic):
    return f"optim8-{'paged' if paged else 'plain'}-{dtype}-{'sr' if stochastic else 'rn'}"


def aligned_model(dtype):
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.from_name("tiny"), **ALIGNED)
    return Llama(config).to(getattr(torch, dtype))


def optim8_grads(params, step):
    """The same full-size gradients on every rank and in the 1-process run."""
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).mul_(1e-2).to(p.dtype) for p in params]


def optim8_run(model, sharded: bool, paged: bool, stochastic: bool):
    """OPTIM8_STEPS AdamW8bit steps on fixed gradients; the optimizer."""
    params = list(model.parameters())
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1, paged=paged, stochastic_rounding=stochastic, seed=3)
    for step in range(1, OPTIM8_STEPS + 1):
        for p, g in zip(params, optim8_grads(params, step)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if sharded else g
        opt.step()
    return opt


def optim8_sharded(out: Path, paged, dtype, stochastic, world):
    """AdamW8bit on FSDP2 shards vs on the whole model (every rank runs both); a DCP round trip."""
    name = optim8_name(paged, dtype, stochastic)
    plain = aligned_model(dtype)
    ref = optim8_run(plain, False, paged, stochastic)
    model = mdist.apply_parallel(aligned_model(dtype), SimpleNamespace(parallel="fsdp", fsdp_cpu_offload=paged),
                                device=torch.device("cpu"))
    opt = optim8_run(model, True, paged, stochastic)
    ref.state_dict(), opt.state_dict()  # paged: write the resident pages back to the host states
    rows_equal, states_equal, local_bytes, full_bytes, kinds, fallback_diff = True, True, 0, 0, {}, 0.0
    for (pname, p), q in zip(model.named_parameters(), plain.parameters()):
        start, mine = sharded_rows(p)
        st, full = opt.state[p], ref.state[q]
        kinds[pname] = "8bit" if "exp_avg_codes" in st else "fp32"
        if ("exp_avg_codes" in st) == ("exp_avg_codes" in full):  # the same kind of moments
            rows_equal &= torch.equal(mine, q.detach()[start:start + mine.shape[0]])
        else:  # float32 moments on the shards, 8-bit ones on the whole parameter
            fallback_diff = max(fallback_diff, float((mine.float() - q.detach()[start:start + mine.shape[0]].float())
                                                     .abs().max()))
        local_bytes += sum(v.nbytes for v in st.values() if isinstance(v, torch.Tensor))
        full_bytes += sum(v.nbytes for v in full.values() if isinstance(v, torch.Tensor))
        if "exp_avg_codes" in st:  # flat rows [start, start + n) of the whole parameter's states
            row = p.numel() // p.shape[0]
            a, n = start * row, mine.numel()
            states_equal &= all(torch.equal(st[k], full[k][a:a + n]) for k in ("exp_avg_codes", "exp_avg_sq_codes"))
            states_equal &= all(torch.equal(st[k], full[k][a // 256:(a + n) // 256])
                                for k in ("exp_avg_absmax", "exp_avg_sq_absmax"))
        elif "exp_avg" in full:
            states_equal &= torch.equal(st["exp_avg"], full["exp_avg"][start:start + mine.shape[0]])
    dckpt.save_sharded(out / f"{name}-ckpt", model, opt, trainable_only=False)
    again = mdist.apply_parallel(aligned_model(dtype), SimpleNamespace(parallel="fsdp", fsdp_cpu_offload=paged),
                                device=torch.device("cpu"))
    opt2 = AdamW8bit(list(again.parameters()), lr=1e-2, weight_decay=0.1, paged=paged, stochastic_rounding=stochastic)
    dckpt.load_sharded(out / f"{name}-ckpt", again, opt2, trainable_only=False)
    reloaded = True
    for a, b in zip(model.parameters(), again.parameters()):
        saved, loaded = opt.state[a], opt2.state[b]
        reloaded &= saved.keys() == loaded.keys() and saved["step"] == loaded["step"]
        reloaded &= all(torch.equal(v, loaded[k]) for k, v in saved.items() if isinstance(v, torch.Tensor))
        reloaded &= torch.equal(sharded_rows(a)[1], sharded_rows(b)[1])
    return {"rows_equal": bool(rows_equal), "states_equal": bool(states_equal), "reloaded": bool(reloaded),
            "fallback_max_diff": fallback_diff,
            "local_state_bytes": local_bytes, "full_state_bytes": full_bytes, "kinds": kinds,
            "steps": sorted({st["step"] for st in opt2.state.values()})}


def sharded_rows(p):
    """(first row, this rank's rows) of a sharded parameter."""
    from minift.optim.sharded import first_row
    return first_row(p), p.to_local().detach()


TRAIN_CASES = [("fsdp", "qlora"), ("ddp", "full")]
# what composes with torchrun, each against the same flags on one process: under FSDP gradient
# checkpointing, activation offload, MLP tiles, the paged 8-bit optimizer and the chunked loss (the
# tiny model's LoRA tensors are under min_8bit_size, so both runs keep float32 moments and agree to
# LOSS_RTOL); under DDP the 8-bit optimizer (and its checkpoints), the chunked loss, gradient
# checkpointing and MLP tiles
TRAIN_EXTRA = {("fsdp", "qlora"): dict(gradient_checkpointing=True, optimizer="paged_adamw8bit", loss_chunk_size=5,
                                       activation_offload=True, mlp_tile_size=4),
               ("ddp", "full"): dict(optimizer="adamw8bit", loss_chunk_size=7, gradient_checkpointing=True,
                                     mlp_tile_size=3)}


def train_config(out: Path, parallel, method, world, **kw):
    fields = dict(method=method, micro_batch_size=2, grad_accum=2, bf16=False, seed=0, progress=False,
                  device="cpu", output_dir=str(out / f"train-{parallel}-{method}-w{world}"), max_steps=3,
                  save_interval=2, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                  keep_last=None, parallel=parallel if world > 1 else None)
    return TrainConfig(**fields | TRAIN_EXTRA.get((parallel, method), {}) | kw)


def run_train(out: Path, parallel, method, world):
    """minift.train for 3 steps (checkpoints at 2 and 3), then again resumed from step 2."""
    config = train_config(out, parallel, method, world)
    first = minift.train(make_model(method), examples(), config)
    again = minift.train(make_model(method), examples(), train_config(out, parallel, method, world,
                                                                   resume_from=str(Path(config.output_dir) / "step-2")))
    return {"summary": first, "resumed": again}


def run_alone(out: Path):
    """Before the spawn: the TRAIN_CASES on one process (checkpoints at 2 and 3), and a copy of each
    run directory for the 2-process runs to resume from its 1-process step-2 checkpoint."""
    import shutil
    for parallel, method in TRAIN_CASES:
        config = train_config(out, parallel, method, 1)
        summary = minift.train(make_model(method), examples(), config)
        (out / f"alone-{parallel}-{method}.json").write_text(json.dumps(summary))
        shutil.copytree(config.output_dir, out / f"train-{parallel}-{method}-from1")
    # torch AdamW's float32 moments cut to rows (FSDP LoRA with CPU offload): steps 1-2 on one process
    model, params, opt = prepared(*FROM_ONE, 1)
    run_steps(model, params, opt, 2, 1, 0, 1, 2)
    from minift.checkpoints import steps as ckpt
    ckpt.save_checkpoint(out / "adamw-from1", 2, model=model, optimizer=opt, method=FROM_ONE[1],
                         trainer_state={}, keep_last=None)


FROM_ONE = ("fsdp", "lora")  # its step 3 after a 1-process checkpoint: compared with case fsdp-lora-a2


def adamw_from_one(out: Path, world, rank):
    from minift.checkpoints import steps as ckpt
    from minift.optim.sharded import first_row
    model, params, opt = prepared(*FROM_ONE, world)
    path = out / "adamw-from1" / "step-2"
    dckpt.load_full_checkpoint(path, model, opt)
    saved = ckpt.read_checkpoint(path)[2]["state"]
    moments = []  # (DTensor?, this rank's rows equal the saved rows) per moment
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            got, full = opt.state[p][key], saved[i][key]
            start, n = first_row(p), p.to_local().shape[0]
            moments.append([type(got).__name__, torch.equal(got.to_local(), full[start:start + n])])
    return {"steps": run_steps(model, params, opt, 2, world, rank, 3, 3), "moments": moments}


def resume_from_one(out: Path, parallel, method):
    run_dir = out / f"train-{parallel}-{method}-from1"
    return minift.train(make_model(method), examples(), train_config(
        out, parallel, method, WORLD, output_dir=str(run_dir), resume_from=str(run_dir / "step-2")))


def nonfinite_save(out: Path, rank):
    """NaN in rank 1's shard only: every rank refuses the sharded save before writing anything."""
    from minift.distributed.run import DistRun
    config = train_config(out, "fsdp", "full", WORLD, output_dir=str(out / "nonfinite"))
    run = DistRun(config)
    model = run.prepare(make_model("full"), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if rank == 1:
        with torch.no_grad():
            dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"].to_local().view(-1)[3] = math.nan
    try:
        run.save(config.output_dir, 1, model=model, optimizer=opt, method="full", trainer_state={},
                 keep_last=None)
        refused = None
    except FloatingPointError as err:
        refused = str(err)
    mdist.barrier()
    root = Path(config.output_dir)
    return {"refused": refused, "written": sorted(os.listdir(root)) if root.exists() else []}


def worker(rank, port, out):
    join(rank, port, WORLD)
    out = Path(out)
    try:
        results = {"nf4": nf4_gather(WORLD), "qlora_layer": qlora_layer_gather(WORLD),
                   "world": mdist.world_size(), "rank": mdist.rank()}
        for parallel, method, accum in CASES:
            results[case_name(parallel, method, accum)] = run_case(out, parallel, method, accum, WORLD, rank)
        for case in OPTIM8_CASES:
            results[optim8_name(*case)] = optim8_sharded(out, *case, WORLD)
        results["adamw-from1"] = adamw_from_one(out, WORLD, rank)
        results["nonfinite-save"] = nonfinite_save(out, rank)
        for parallel, method in TRAIN_CASES:
            results[f"train-{parallel}-{method}"] = run_train(out, parallel, method, WORLD)
            results[f"from1-{parallel}-{method}"] = resume_from_one(out, parallel, method)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# ---- another world size: the 2-process checkpoints read by 3 processes -------------------
THREE = 3
THREE_CASES = [("fsdp", "full", 2), ("fsdp", "qlora", 2)]


def worker3(rank, port, out):
    """Steps 3 and 4 from the 2-process step-2 checkpoints of THREE_CASES on 3 processes (DCP re-slices
    every shard, the NF4 bytes and AdamW's moments included), and the 8-bit optimizer's states of
    the first OPTIM8 case re-sliced to 3 ranks (rows 84 + 84 + 83 of the 251-row embedding)."""
    join(rank, port, THREE)
    out = Path(out)
    try:
        results = {}
        for parallel, method, accum in THREE_CASES:
            name = case_name(parallel, method, accum)
            model, params, opt = prepared(parallel, method, THREE)
            dckpt.load_sharded(out / f"{name}-ckpt", model, opt, trainable_only=method != "full")
            results[name] = run_steps(model, params, opt, accum, THREE, rank, 3, 4)
        paged, dtype, stochastic = OPTIM8_CASES[0]
        model = mdist.apply_parallel(aligned_model(dtype), SimpleNamespace(parallel="fsdp"), device=torch.device("cpu"))
        opt = AdamW8bit(list(model.parameters()), lr=1e-2, weight_decay=0.1)
        dckpt.load_sharded(out / f"{optim8_name(paged, dtype, stochastic)}-ckpt", model, opt, trainable_only=False)
        states = {}
        for name, p in model.named_parameters():
            st = opt.state[p]
            states[name] = {"first_row": sharded_rows(p)[0], "rows": p.to_local().shape[0],
                            **{k: v.tolist() for k, v in st.items() if isinstance(v, torch.Tensor)}}
        results["optim8"] = states
        results["empty_shard"] = empty_shard(out, rank)
        (out / f"three{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def empty_shard(out: Path, rank):
    """A (2, 256) weight on 3 ranks: rank 2 holds no row. AdamW8bit steps it (8-bit moments) and
    reloads it from a sharded checkpoint written while the gradients were still set."""
    torch.manual_seed(0)
    plain = nn.Linear(256, 2, bias=False)
    holder = nn.Sequential(nn.Linear(256, 2, bias=False))
    holder[0].weight.data.copy_(plain.weight.data)
    fully_shard(holder, mesh=init_device_mesh("cpu", (THREE,)))
    p = holder[0].weight
    opt = AdamW8bit([p], lr=1e-2, min_8bit_size=0)
    ref = AdamW8bit([plain.weight], lr=1e-2, min_8bit_size=0)
    for step in range(2):
        g = torch.randn(2, 256, generator=torch.Generator().manual_seed(step))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        plain.weight.grad = g.clone()
        opt.step()
        ref.step()
    start, mine = sharded_rows(p)
    dckpt.save_sharded(out / "empty-shard-ckpt", holder, opt, trainable_only=False)
    again = AdamW8bit([p], lr=1e-2, min_8bit_size=0)
    dckpt.load_sharded(out / "empty-shard-ckpt", holder, again, trainable_only=False)
    st, st2 = opt.state[p], again.state[p]
    return {"rows": mine.shape[0], "equal": torch.equal(mine, plain.weight.data[start:start + mine.shape[0]]),
            "eight_bit": "exp_avg_codes" in st, "reloaded": st.keys() == st2.keys() and all(
                torch.equal(st[k], st2[k]) for k in st if isinstance(st[k], torch.Tensor))}


free_port = mdist.free_port
