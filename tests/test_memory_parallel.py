"""One GPU of a torchrun job through estimate_memory(world_size=...): FSDP2 traced over torch's
fake process group (rank 0's shards), DDP as the one-process step plus the reducer's gradient
buckets. tests/test_trace_agreement.py holds the FSDP traces against 2 gloo processes."""
import os

import pytest
import torch.distributed as dist

from minift import estimate_memory
from minift.planning.agreement import model_config

SMALL = model_config()  # 3 layers, hidden 128, 4 query / 2 key-value heads, vocabulary 512


def est(method="lora", **kw):
    kw.setdefault("device", "cpu")
    return estimate_memory(SMALL, method, 2, 64, **kw)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_shards_weights_gradients_and_states(method):
    one = est(method)
    by_world = {w: est(method, world_size=w) for w in (2, 4)}
    # AdamW keeps two moments in each parameter's dtype and a 4-byte step counter per tensor
    counters = one.optimizer_states - 2 * one.trainable_params
    assert 0 < counters < 4 * 100
    for w, got in by_world.items():
        assert (got.settings["world_size"], got.settings["parallel"]) == (w, "fsdp")
        # every row count here divides by 4: the shards are exact
        assert got.trainable_params * w == one.trainable_params
        assert got.gradients * w == one.gradients
        # the moments are sharded with their parameters, the step counters are not
        assert got.optimizer_states == counters + 2 * one.trainable_params // w
        # NF4's code books stay whole on every rank
        assert 0 <= got.frozen_weights - one.frozen_weights / w < 4096
    assert by_world[4].total < by_world[2].total < one.total
    assert not dist.is_initialized()  # the fake process group is gone after the trace


def test_fsdp_on_the_cuda_path_shards_as_on_the_cpu_path():
    cpu, cuda = est("qlora", world_size=2), est("qlora", world_size=2, device="cuda")
    for key in ("frozen_weights", "trainable_params", "gradients", "optimizer_states"):
        assert getattr(cuda, key) == getattr(cpu, key), key
    assert cuda.settings["device"] == "cuda"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_replicates_the_step_and_adds_the_gradient_buckets(method):
    one = est(method)
    ddp = est(method, world_size=2, parallel="ddp")
    buckets = one.trainable_params  # a flat copy of every trainable gradient, kept from the first backward
    assert ddp.gradients == one.gradients + buckets and ddp.total == one.total + buckets
    assert ddp.reserved == one.reserved + buckets
    for key in ("frozen_weights", "trainable_params", "optimizer_states", "activations", "other", "host"):
        assert getattr(ddp, key) == getattr(one, key), key
    assert (ddp.settings["world_size"], ddp.settings["parallel"]) == (2, "ddp")
    # a replica does not depend on how many there are
    assert est(method, world_size=8, parallel="ddp").as_dict() == ddp.as_dict()


def test_one_process_is_the_plain_step():
    one = est("qlora")
    assert est("qlora", world_size=1).as_dict() == one.as_dict()
    assert est("qlora", world_size=1, parallel="fsdp").as_dict() == one.as_dict()


def test_fsdp_cpu_offload_is_refused_not_guessed():
    # in a trace the host and the stand-in device are one CPU: offloaded shards would stay counted
    # as device memory, so the estimate says it cannot answer
    with pytest.raises(ValueError, match="fsdp_cpu_offload is not traced"):
        est("lora", world_size=2, device="cuda", cpu_offload=True)


@pytest.mark.parametrize("kw, err, match", [
    (dict(parallel="zero3", world_size=2), ValueError, "parallel must be one of fsdp, ddp"),
    (dict(world_size=0), ValueError, "world_size must be a positive integer, got 0"),
    (dict(cpu_offload="yes", world_size=2), TypeError, "cpu_offload must be True or False"),
    (dict(parallel="ddp", world_size=2, cpu_offload=True), ValueError, "use parallel='fsdp'"),
    (dict(world_size=2, optimizer_in_backward=True, max_grad_norm=None), ValueError,
     "optimizer_in_backward=True is not supported with world_size > 1"),
])
def test_bad_parallel_settings_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        est(**kw)


def test_a_sharded_trace_refuses_a_process_that_has_a_group(tmp_path, monkeypatch):
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="not under torchrun"):
            est(world_size=2)
        assert est().total > 0  # one process needs no group of its own
    finally:
        dist.destroy_process_group()
