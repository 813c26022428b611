"""Two-process gloo runs of minift/distributed.py, minift/nf4_fsdp.py and minift/dist_checkpoint.py.

One spawn of 2 CPU processes (module fixture) runs every case; the tests compare what the ranks
wrote with 1-process runs of the same code in this process. Cases: FSDP2 full / LoRA / QLoRA and
DDP LoRA, 3 optimizer steps each, a sharded checkpoint after step 2 and a resume from it, the
consolidated exports, and the NF4 all-gather (bit equality and bytes on the wire).
"""
import json
import math
import os
import random
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

import minift
from minift import checkpoint as ckpt
from minift import dist_checkpoint as dckpt
from minift import distributed as mdist
from minift.config import ModelConfig
from minift.model import Llama
from minift.nf4_fsdp import ShardedNF4Linear, shardable_nf4
from minift.nf4_linear import NF4Linear
from minift.schedule import step_groups
from minift.trainer import TrainConfig, token_loss_sum, trained_tokens

WORLD = 2
STEPS = 3
# (parallel, method, grad_accum): grad_accum 2 hands whole micro-batches to the ranks; 1 splits
# each micro-batch (3 rows) by rows, 2 + 1.
CASES = [("fsdp", "full", 2), ("fsdp", "lora", 2), ("fsdp", "qlora", 2), ("ddp", "lora", 1)]
# Same samples, same math, another summation order (per-rank partial sums, then an all-reduce):
# measured differences on this CPU stay below 1e-6 relative; 1e-5 leaves room across CPUs.
LOSS_RTOL = 1e-5


def _case_name(parallel, method, accum):
    return f"{parallel}-{method}-a{accum}"


def _examples(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 14)
        ids = [rng.randrange(3, 256) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _config(accum):
    return TrainConfig(micro_batch_size=3 if accum == 1 else 2, grad_accum=accum, bf16=False, seed=0,
                       progress=False, device="cpu")


def _model(method):
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny"))
    if method == "qlora":
        minift.quantize_model(model)
    if method != "full":
        minift.lora_wrap(model, r=4, alpha=8)
        with torch.no_grad():  # B != 0 so the adapters change the output from step 1
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    return model


def _loss_sum(model, batch, device):
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return token_loss_sum(model(**inputs), batch["labels"].to(device))


def _prepared(parallel, method, world):
    model = _model(method)
    if world > 1:
        model = mdist.apply_parallel(model, SimpleNamespace(parallel=parallel, bf16=False),
                                     device=torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-2)


def _steps(model, params, optimizer, accum, world, rank, first, last):
    """Run optimizer steps first..last (1-based) of the fixed data order; their losses and norms."""
    groups = step_groups(_examples(), _config(accum))
    out = []
    for step in range(1, last + 1):
        group = next(groups)[2]
        if step < first:
            continue
        local = mdist.shard_group(group, rank, world)
        loss, n = mdist.accumulate_gradients(model, local, "cpu", _loss_sum, trained_tokens)
        norm = mdist.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append({"loss": float(loss), "norm": norm, "tokens": n})
    return out


def run_case(out: Path, parallel, method, accum, world, rank):
    """Steps 1-3 with a sharded checkpoint after 2, then a fresh model resumed from it for step 3."""
    name = _case_name(parallel, method, accum)
    trainable_only = method != "full"
    model, params, opt = _prepared(parallel, method, world)
    result = {"steps": _steps(model, params, opt, accum, world, rank, 1, 2)}
    dckpt.save_sharded(out / f"{name}-ckpt", model, opt, trainable_only=trainable_only)
    result["steps"] += _steps(model, params, opt, accum, world, rank, 3, 3)
    if method == "full":
        dckpt.export_model(model, out / f"{name}-export", ModelConfig.from_name("tiny"))
    else:
        dckpt.export_adapter(model, out / f"{name}-export")
    model, params, opt = _prepared(parallel, method, world)
    dckpt.load_sharded(out / f"{name}-ckpt", model, opt, trainable_only=trainable_only)
    result["resumed"] = _steps(model, params, opt, accum, world, rank, 3, 3)
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


def _padded_bytes(params, world):
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
    model, _, _ = _prepared("fsdp", "qlora", world)
    layer = model.model.layers[0]
    counter = CountingAllGather()
    layer.set_custom_all_gather(counter)
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 6)))
    params = [p.to_local() for p in layer.parameters()]
    return {"calls": counter.calls, "expected": _padded_bytes([p for p in layer.parameters()], world),
            "nf4_bytes": sum(p.numel() for n, p in layer.named_parameters() if n.endswith("nf4_bytes")),
            "base_numel": sum(m.in_features * m.out_features for m in layer.modules()
                              if isinstance(m, ShardedNF4Linear)),
            "local_numel": sum(p.numel() for p in params)}


TRAIN_CASES = [("fsdp", "qlora"), ("ddp", "full")]
# they compose: gradient checkpointing with FSDP, the 8-bit optimizer (and its checkpoints) with DDP
TRAIN_EXTRA = {("fsdp", "qlora"): dict(gradient_checkpointing=True), ("ddp", "full"): dict(optimizer="adamw8bit")}


def train_config(out: Path, parallel, method, world, **kw):
    kw = dict(TRAIN_EXTRA.get((parallel, method), {}), **kw)
    return TrainConfig(method=method, micro_batch_size=2, grad_accum=2, bf16=False, seed=0, progress=False,
                       device="cpu", output_dir=str(out / f"train-{parallel}-{method}-w{world}"), max_steps=3,
                       save_interval=2, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                       keep_last=None, parallel=parallel if world > 1 else None, **kw)


def run_train(out: Path, parallel, method, world):
    """minift.train for 3 steps (checkpoints at 2 and 3), then again resumed from step 2."""
    config = train_config(out, parallel, method, world)
    first = minift.train(_model(method), _examples(), config)
    again = minift.train(_model(method), _examples(), train_config(out, parallel, method, world,
                                                                   resume_from=str(Path(config.output_dir) / "step-2")))
    return {"summary": first, "resumed": again}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    out = Path(out)
    mdist.init_from_env("cpu")
    try:
        results = {"nf4": nf4_gather(WORLD), "qlora_layer": qlora_layer_gather(WORLD),
                   "world": mdist.world_size(), "rank": mdist.rank()}
        for parallel, method, accum in CASES:
            results[_case_name(parallel, method, accum)] = run_case(out, parallel, method, accum, WORLD, rank)
        for parallel, method in TRAIN_CASES:
            results[f"train-{parallel}-{method}"] = run_train(out, parallel, method, WORLD)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same cases on one process, no process group."""
    out = tmp_path_factory.mktemp("single")
    return dict({_case_name(*c): run_case(out, *c, 1, 0) for c in CASES}, dir=out)


def test_ranks_joined(runs):
    _, results = runs
    assert [(r["rank"], r["world"]) for r in results] == [(0, WORLD), (1, WORLD)]


@pytest.mark.parametrize("case", [_case_name(*c) for c in CASES])
def test_two_processes_match_one(runs, single, case):
    _, results = runs
    for r in results:  # every rank reports the global loss and token count
        got, want = r[case]["steps"], single[case]["steps"]
        assert [s["tokens"] for s in got] == [s["tokens"] for s in want]
        for g, w in zip(got, want):
            assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL)
            assert g["norm"] == pytest.approx(w["norm"], rel=LOSS_RTOL)


@pytest.mark.parametrize("case", [_case_name(*c) for c in CASES])
def test_resume_same_world_size_is_exact(runs, case):
    _, results = runs
    for r in results:
        assert r[case]["resumed"] == r[case]["steps"][2:]


@pytest.mark.parametrize("case", [_case_name(*c) for c in CASES])
def test_resume_on_one_process_from_two(runs, case):
    out, results = runs
    parallel, method, accum = next(c for c in CASES if _case_name(*c) == case)
    model, params, opt = _prepared(parallel, method, 1)
    dckpt.load_sharded(out / f"{case}-ckpt", model, opt, trainable_only=method != "full")
    step3 = _steps(model, params, opt, accum, 1, 0, 3, 3)[0]
    assert step3["loss"] == pytest.approx(results[0][case]["steps"][2]["loss"], rel=LOSS_RTOL)


def test_load_sharded_names_a_missing_checkpoint(tmp_path):
    model, _, opt = _prepared("fsdp", "lora", 1)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        dckpt.load_sharded(tmp_path / "nowhere", model, opt, trainable_only=True)


@pytest.mark.parametrize("key", ["dq1", "dq0"])
def test_nf4_all_gather_is_bit_exact_and_4bit(runs, key):
    _, results = runs
    for r in results:
        got = r["nf4"][key]
        assert got["equal"]  # fp32 and bf16 dequantization after the gather == unsharded layer
        (call,) = got["calls"]  # one all-gather for the layer's one parameter
        assert call["dtype"] == "torch.uint8"
        assert call["sent"] == math.ceil(got["nf4_bytes"] / WORLD) == got["local_bytes"]
        assert call["received"] == call["sent"] * WORLD
        # (96, 80) weight: 3840 packed bytes + scales, against 15360 bytes for a bf16 copy
        assert got["nf4_bytes"] < 0.3 * 96 * 80 * 2


def test_qlora_layer_gathers_its_parameters_as_stored(runs):
    _, results = runs
    for r in results:
        got = r["qlora_layer"]
        received = sum(c["received"] for c in got["calls"])
        assert received == got["expected"]  # every parameter at its stored size: nothing upcast
        assert got["nf4_bytes"] < 0.6 * got["base_numel"]  # ~0.52 bytes per base weight
        assert got["local_numel"] * WORLD >= got["expected"] // 4  # each rank holds 1/WORLD


def _exports(runs, single, case):
    out, _ = runs
    return out / f"{case}-export", single["dir"] / f"{case}-export"


def test_consolidated_adapter_loads_in_peft(runs, single, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    two, one = _exports(runs, single, "fsdp-lora-a2")
    assert sorted(p.name for p in two.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    minift.save_model(_model("full"), tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, two).eval()
    ours = minift.load_adapter(_model("lora"), two).eval()
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        want = ours(ids)
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)
        trained_alone = minift.load_adapter(_model("lora"), one).eval()(ids)
    torch.testing.assert_close(want, trained_alone, rtol=1e-4, atol=1e-4)  # same training, 1 vs 2 ranks


@pytest.mark.parametrize("case", ["fsdp-qlora-a2", "ddp-lora-a1"])
def test_consolidated_adapter_matches_one_process(runs, single, case):
    from safetensors.torch import load_file

    two, one = _exports(runs, single, case)
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_consolidated_full_model_loads_in_transformers(runs, single):
    transformers = pytest.importorskip("transformers")
    two, one = _exports(runs, single, "fsdp-full-a2")
    hf = transformers.LlamaForCausalLM.from_pretrained(two, torch_dtype=torch.float32).eval()
    ours = minift.load_model(two, dtype=torch.float32).eval()
    alone = minift.load_model(one, dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids), alone(ids), rtol=1e-4, atol=1e-4)
    # the export is the trained model, not the initial one
    assert not torch.allclose(ours.lm_head.weight, _model("full").lm_head.weight)


@pytest.mark.parametrize("parallel,method", TRAIN_CASES)
def test_train_two_processes(runs, tmp_path, parallel, method):
    out, results = runs
    run_dir = out / f"train-{parallel}-{method}-w{WORLD}"
    got = [r[f"train-{parallel}-{method}"] for r in results]
    alone = minift.train(_model(method), _examples(), train_config(tmp_path, parallel, method, 1))
    two = got[0]["summary"]
    assert (two["world_size"], two["parallel"]) == (WORLD, parallel)
    assert (alone["world_size"], alone["parallel"]) == (1, None)
    assert got[1]["summary"]["last_loss"] == two["last_loss"]  # every rank reports the global loss
    for key in ("first_loss", "last_loss"):
        assert two[key] == pytest.approx(alone[key], rel=LOSS_RTOL)
    assert (two["trained_tokens"], two["tokens"]) == (alone["trained_tokens"], alone["tokens"])
    # rank 0 alone wrote the metrics: one line per step
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == WORLD
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    # resumed from step 2 on the same world size: the same step 3, bit for bit
    assert got[0]["resumed"]["last_loss"] == two["last_loss"]
    assert got[0]["resumed"]["resumed_from"].endswith("step-2")


@pytest.mark.parametrize("parallel,method", TRAIN_CASES)
def test_train_resumes_on_one_process(runs, tmp_path, parallel, method):
    out, results = runs
    run_dir = tmp_path / f"train-{parallel}-{method}-w1"
    shutil.copytree(out / f"train-{parallel}-{method}-w{WORLD}", run_dir)
    config = train_config(tmp_path, parallel, method, 1, resume_from=str(run_dir / "step-2"))
    summary = minift.train(_model(method), _examples(), config)
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step-2")
    assert summary["last_loss"] == pytest.approx(results[0][f"train-{parallel}-{method}"]["summary"]["last_loss"],
                                                 rel=LOSS_RTOL)


def test_fsdp_refuses_the_8bit_optimizer(tmp_path, monkeypatch):
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    config = train_config(tmp_path, "fsdp", "lora", 2, optimizer="paged_adamw8bit")
    with pytest.raises(ValueError, match="optimizer='paged_adamw8bit' with parallel='fsdp'"):
        minift.train(_model("lora"), _examples(), config)
    assert not dist.is_initialized()  # refused before joining anything


def test_parallel_without_torchrun_is_refused(tmp_path):
    config = train_config(tmp_path, "fsdp", "lora", 2)
    with pytest.raises(ValueError, match="TrainConfig.parallel='fsdp' needs a torchrun launch"):
        minift.train(_model("lora"), _examples(), config)


@pytest.mark.slow
def test_example_under_torchrun_matches_one_process(tmp_path):
    """examples/train_llama.py under torchrun (2 gloo processes) against the same flags on one."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "train_llama.py"
    flags = ["--method", "qlora", "--max-steps", "2", "--eval-samples", "2", "--device", "cpu", "--batch-size", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), str(script)],
            "one": [sys.executable, str(script)]}
    summaries = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + flags + ["--output", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    two, one = summaries["two"], summaries["one"]
    assert (two["world_size"], two["parallel"], one["world_size"]) == (2, "fsdp", 1)
    for key in ("first_loss", "last_loss"):
        assert two[key] == pytest.approx(one[key], rel=LOSS_RTOL)
    assert sorted(p.name for p in (tmp_path / "two" / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]


# ---- one-process pieces: no process group needed -------------------------------------------
def _group(rows_per_batch):
    return [{"input_ids": torch.arange(n * 4).view(n, 4) + 100 * i, "labels": torch.arange(n * 4).view(n, 4),
             "attention_mask": torch.ones(n, 4, dtype=torch.long)} for i, n in enumerate(rows_per_batch)]


@pytest.mark.parametrize("rows,world", [([2, 2], 2), ([3, 1, 2, 2], 2), ([5], 2), ([3], 3), ([1], 2), ([2, 1, 3], 4)])
def test_shard_group_hands_out_every_row_once(rows, world):
    group = _group(rows)
    parts = [mdist.shard_group(group, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same number of forwards on every rank
    seen = sorted(tuple(row.tolist()) for p in parts for b in p
                  for row, lab in zip(b["input_ids"], b["labels"]) if (lab != -100).any())
    want = sorted(tuple(row.tolist()) for b in group for row in b["input_ids"])
    assert seen == want
    # what the ranks count together is the 1-process count
    assert sum(trained_tokens(b) for p in parts for b in p) == sum(trained_tokens(b) for b in group)


def test_shard_group_on_one_process_is_the_group():
    group = _group([2, 3])
    assert mdist.shard_group(group, 0, 1) is group


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        mdist.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE must be >= 1"):
        mdist.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun --nproc_per_node"):
        mdist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mdist.init_from_env("cpu") == torch.device("cpu") and not dist.is_initialized()


def test_resolve_parallel():
    assert mdist.resolve_parallel(None, 1) is None
    assert mdist.resolve_parallel(None, 4) == "fsdp"
    assert mdist.resolve_parallel("ddp", 4) == "ddp"
    with pytest.raises(ValueError, match="TrainConfig.parallel must be one of fsdp, ddp; got 'zero3'"):
        mdist.resolve_parallel("zero3", 4)


def test_train_config_parallel_fields():
    assert TrainConfig().parallel is None and TrainConfig().fsdp_cpu_offload is False
    with pytest.raises(ValueError, match="TrainConfig.parallel"):
        TrainConfig(parallel="tp")
    with pytest.raises(TypeError, match="TrainConfig.fsdp_cpu_offload must be True or False"):
        TrainConfig(fsdp_cpu_offload="yes")


def test_apply_parallel_needs_a_process_group_and_decoder_layers():
    model = _model("lora")
    assert mdist.apply_parallel(model, SimpleNamespace(parallel=None)) is model  # one process: as is
    with pytest.raises(RuntimeError, match="needs a process group.*init_from_env"):
        mdist.apply_parallel(model, SimpleNamespace(parallel="fsdp"))
    with pytest.raises(TypeError, match="Linear has no model.layers"):
        mdist.decoder_layers(nn.Linear(2, 2))


def test_accumulate_on_one_process_equals_the_loop():
    from minift.trainer import accumulate_gradients

    group = next(step_groups(_examples(), _config(2)))[2]
    grads = []
    for run in ("loop", "distributed"):
        model = _model("lora")
        if run == "loop":
            loss, n = accumulate_gradients(model, group, "cpu", bf16=False)
        else:
            loss, n = mdist.accumulate_gradients(model, group, "cpu", _loss_sum, trained_tokens)
        grads.append(([p.grad for p in model.parameters() if p.requires_grad], float(loss), n))
    (g1, l1, n1), (g2, l2, n2) = grads
    assert (l1, n1) == (l2, n2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
