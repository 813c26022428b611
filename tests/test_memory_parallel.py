"""minift/memory/parallel.py and `minift plan --gpus`: per-GPU memory under FSDP2 and DDP."""
import math

import pytest
import torch

import minift
from minift.__main__ import main
from minift.memory.estimate import estimate_memory
from minift.memory.parallel import nf4_flat_bytes, per_gpu
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.fsdp import ShardedNF4Linear, shardable_nf4
from minift.nf4.linear import NF4Linear

TINY = ModelConfig.from_name("tiny")


@pytest.mark.parametrize("shape", [(64, 64), (96, 80), (128, 4096), (7, 9)])
def test_nf4_flat_bytes_is_the_sharded_parameter_size(shape):
    layer = ShardedNF4Linear(NF4Linear.from_weight(torch.randn(*shape)))
    assert layer.nf4_bytes.numel() == nf4_flat_bytes(shape[0] * shape[1])


def _tiny(method):
    torch.manual_seed(0)
    model = Llama(TINY)
    if method == "qlora":
        minift.quantize_model(model)
    if method != "full":
        minift.lora_wrap(model, r=4, alpha=8)
    shardable_nf4(model)
    return model


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gathered_buffers_are_two_layers_and_the_root_of_the_real_model(method):
    model = _tiny(method)
    layer = sum(p.nbytes for p in model.model.layers[0].parameters())
    in_layers = {id(p) for m in model.model.layers for p in m.parameters()}
    root = sum(p.nbytes for p in model.parameters() if id(p) not in in_layers)
    est = estimate_memory(TINY, method, 1, 16, r=4, dtype=torch.float32)
    got = per_gpu(est, TINY, world_size=2, parallel="fsdp", r=4, e=4, ae=4)
    assert got.terms["all_gather_buffers"] == 2 * layer + root


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_shards_weights_grads_and_states(method):
    cfg = ModelConfig.from_name("llama-2-7b")
    est = estimate_memory(cfg, method, 1, 512, gradient_checkpointing=True)
    by_world = {w: per_gpu(est, cfg, world_size=w, parallel="fsdp") for w in (2, 4)}
    for w, got in by_world.items():
        assert got.optimizer_states == math.ceil(est.optimizer_states / w)
        # each rank runs its own micro-batch; the optimizer step (full's peak) holds none
        step = got.settings["peak_moment"] == "optimizer_step"
        assert got.activations == (0 if step else est.activations)
        assert step == (method == "full")
        assert got.total == sum(got.as_dict()[c] for c in ("frozen_weights", "trainable_params", "gradients",
                                                            "optimizer_states", "activations", "other"))
    assert by_world[4].total < by_world[2].total < est.total + by_world[2].terms["all_gather_buffers"]


def test_cpu_offload_moves_the_shards_to_the_host():
    cfg = ModelConfig.from_name("llama-2-70b")
    est = estimate_memory(cfg, "qlora", 1, 2048, gradient_checkpointing=True)
    on, off = (per_gpu(est, cfg, world_size=2, parallel="fsdp", cpu_offload=c) for c in (False, True))
    shards = sum(math.ceil(getattr(est, c) / 2) for c in ("frozen_weights", "trainable_params", "gradients",
                                                          "optimizer_states"))
    assert off.terms["host_bytes"] == shards and on.terms["host_bytes"] == 0
    assert off.optimizer_states == 0
    assert on.total - off.total == shards  # the forward/backward peak, less the shards


def test_ddp_replicates_and_adds_the_gradient_buckets():
    est = estimate_memory(TINY, "lora", 2, 32, r=4)
    got = per_gpu(est, TINY, world_size=8, parallel="ddp", r=4)
    assert got.total == est.total + est.gradients and got.terms["ddp_buckets"] == est.gradients
    assert got.frozen_weights == est.frozen_weights


@pytest.mark.parametrize("kw,err,match", [
    (dict(parallel="zero3"), ValueError, "parallel must be one of fsdp, ddp"),
    (dict(world_size=0), ValueError, "world_size must be a positive integer"),
    (dict(cpu_offload="yes"), TypeError, "cpu_offload must be True or False"),
    (dict(parallel="ddp", cpu_offload=True), ValueError, "parallel='fsdp' only"),
])
def test_per_gpu_rejects_bad_settings(kw, err, match):
    est = estimate_memory(TINY, "lora", 1, 16, optimizer=kw.pop("optimizer", "adamw"))
    args = dict(world_size=2, parallel="fsdp") | kw
    with pytest.raises(err, match=match):
        per_gpu(est, TINY, **args)


def _eight_bit(n):
    return 2 * n + 8 * math.ceil(n / 256)


def test_fsdp_8bit_states_are_sharded_with_float32_fallbacks():
    """Full FT: every 2-D tensor has rows of 4096 values (8-bit on shards); the 4096-value norms are
    8-bit on one GPU but 1-D, so float32 on shards. LoRA: B (out, 16) has rows of 16 values."""
    cfg = ModelConfig.from_name("llama-3.1-8b")
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    one = estimate_memory(cfg, "full", 1, 512, optimizer="adamw8bit")
    two = estimate_memory(cfg, "full", 1, 512, optimizer="adamw8bit", world_size=2)
    norms = 2 * layers + 1
    assert two.optimizer_states == math.ceil((one.optimizer_states + norms * (8 * h - _eight_bit(h))) / 2)
    one = estimate_memory(cfg, "lora", 1, 512, r=16, optimizer="adamw8bit")
    four = estimate_memory(cfg, "lora", 1, 512, r=16, optimizer="adamw8bit", world_size=4)
    b = [o * 16 for i, o in cfg.linear_shapes().values()] * layers
    assert four.optimizer_states == math.ceil((one.optimizer_states + sum(8 * n - _eight_bit(n) for n in b)) / 4)
    # paged: the 8-bit pages (LoRA A) on the host, a quarter each; float32 B on the GPU
    paged = estimate_memory(cfg, "lora", 1, 512, r=16, optimizer="paged_adamw8bit", world_size=4,
                            paged_device_budget=0)
    a = [16 * i for i, o in cfg.linear_shapes().values()] * layers
    assert paged.terms["host_bytes"] == math.ceil(sum(_eight_bit(n) for n in a) / 4)
    assert paged.optimizer_states == math.ceil(sum(8 * n for n in b) / 4)


def test_plan_70b_qlora_on_two_24gb_gpus(capsys):
    base = ["plan", "--model", "llama-2-70b", "--gpu-memory", "24GB", "--gpus", "2", "--gradient-checkpointing"]
    assert main(base + ["--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs, FSDP: memory per GPU" in out
    assert "| with CPU offload: per GPU |" in out
    assert "Recommendation: QLoRA with FSDP CPU offload (--fsdp-cpu-offload)" in out
    assert main(base + ["--seq-len", "2048", "--cpu-offload"]) == 0
    assert "Recommendation: QLoRA — the highest-quality method that fits" in capsys.readouterr().out
    assert main(base + ["--seq-len", "2048", "--parallel", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs, DDP" in out and "Recommendation: nothing fits" in out


def test_plan_gpus_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "tiny", "--gpu-memory", "24GB", "--gpus", "0"])
    assert exc.value.code == 2 and "--gpus must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--gpu-memory", "24GB", "--gpus", "2", "--parallel", "ddp", "--cpu-offload"])
    assert "--cpu-offload: applies to --parallel fsdp only" in capsys.readouterr().err


def test_estimate_memory_world_size_is_the_per_gpu_estimate():
    cfg = ModelConfig.from_name("llama-2-7b")
    one = estimate_memory(cfg, "qlora", 2, 1024)
    assert estimate_memory(cfg, "qlora", 2, 1024, world_size=1) == one
    for kw in (dict(world_size=4), dict(world_size=4, parallel="fsdp"), dict(world_size=2, parallel="ddp"),
               dict(world_size=2, cpu_offload=True), dict(world_size=1, parallel="fsdp")):
        want = per_gpu(one, cfg, world_size=kw["world_size"], parallel=kw.get("parallel", "fsdp"),
                       cpu_offload=kw.get("cpu_offload", False))
        assert estimate_memory(cfg, "qlora", 2, 1024, **kw) == want
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        estimate_memory(cfg, "qlora", world_size=0)
