"""estimate_memory: its arguments checked (errors name them), the estimate against the real step
on the CPU path, and what every estimate carries (reserved bytes, the peak's moment, the
TrainConfig it traced)."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from minift import TrainConfig, estimate_memory
from minift.memory.report import CATEGORIES
from minift.models.config import ModelConfig
from minift.planning.agreement import model_config
from minift.planning.estimate import TRAIN_FIELDS
from minift.planning.trace import trace_step

SMALL = model_config()  # 3 layers, hidden 128, 4 query / 2 key-value heads, vocabulary 512

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def small(method="lora", batch_size=2, seq_len=64, **kw):
    return estimate_memory(SMALL, method, batch_size, seq_len, device="cpu", **kw)


# ---- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(config_or_preset="llama-9"), "unknown model preset 'llama-9'; known presets: .*llama-3-8b"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(seq_len=-5), "seq_len must be a positive integer, got -5"),
    (dict(method="dora"), "method must be one of full, lora, qlora"),
    (dict(optimizer="sgd"), "optimizer must be one of adamw, adamw8bit, paged_adamw8bit"),
    (dict(target_modules=["qkv"]), r"target_modules: unknown names \['qkv'\]"),
    (dict(target_modules=[]), "target_modules is empty: nothing would be adapted"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(seq_len=257), r"seq_len 257 is longer than the model's max_position_embeddings \(256\)"),
    (dict(device="tpu"), "device must be one of cuda, cpu"),
    (dict(r=0), "r must be a positive integer"),
    (dict(objective="ppo"), "objective must be one of sft, dpo"),
    (dict(loss_chunk_size=0), "loss_chunk_size must be a positive integer or None, got 0"),
    (dict(mlp_tile_size=0), "mlp_tile_size must be a positive integer or None, got 0"),
    (dict(paged_device_budget=-1), "paged_device_budget must be an integer >= 0 or None, got -1"),
    (dict(activation_offload=True), "set gradient_checkpointing=True as well"),
    (dict(optimizer_in_backward=True), r"set max_grad_norm=None \(got 1.0\)"),
])
def test_bad_values_name_the_argument(kwargs, match):
    # the parallel settings: tests/test_memory_parallel.py
    args = dict(config_or_preset="tiny", seq_len=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config_or_preset=42), "config_or_preset must be a ModelConfig or a preset name, got int"),
    (dict(batch_size=2.0), "batch_size must be a positive integer, got float 2.0"),
    (dict(batch_size=True), "batch_size must be a positive integer, got bool True"),
    (dict(seq_len="64"), "seq_len must be a positive integer, got str '64'"),
    (dict(attention_mask=None), "attention_mask must be True or False, got NoneType"),
    (dict(target_modules=7), "target_modules must be 'all-linear' or a list of names, got int"),
    (dict(gradient_checkpointing=True, activation_offload="yes"),
     "activation_offload must be True or False, got str 'yes'"),
])
def test_bad_types_name_the_argument(kwargs, match):
    args = dict(config_or_preset="tiny", seq_len=64)
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        estimate_memory(**args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gradient_checkpointing="no"), TypeError, "gradient_checkpointing must be True or False"),
    (dict(gradient_checkpointing=1), TypeError, "gradient_checkpointing must be True or False"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(parallel="zero3"), ValueError, "parallel must be one of fsdp, ddp"),
    # minift.distributed.run.DistRun refuses it: the hooks would step before DDP's all-reduce
    (dict(world_size=2, parallel="ddp", optimizer_in_backward=True, max_grad_norm=None), ValueError,
     "optimizer_in_backward"),
])
def test_more_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        estimate_memory("tiny", seq_len=64, **kwargs)


def test_an_unknown_keyword_is_named_beside_the_fields_there_are():
    with pytest.raises(TypeError, match="unknown argument[(]s[)] loss_chunk_sise; TrainConfig fields of a "
                                        "step are .*loss_chunk_size"):
        estimate_memory("tiny", seq_len=64, loss_chunk_sise=64)
    # fields of the run, not of a step, are no estimate's arguments
    for field, value in (("learning_rate", 1e-3), ("output_dir", "runs/x"), ("max_steps", 10)):
        assert field not in TRAIN_FIELDS
        with pytest.raises(TypeError, match=f"unknown argument[(]s[)] {field};"):
            estimate_memory("tiny", seq_len=64, **{field: value})


def test_numpy_integers_are_accepted():
    a = estimate_memory("tiny", "lora", np.int64(2), np.int32(64), r=np.int16(8), device="cpu")
    assert a.as_dict() == estimate_memory("tiny", "lora", 2, 64, r=8, device="cpu").as_dict()
    assert a.settings["batch_size"] == 2 and type(a.settings["batch_size"]) is int


def test_duplicate_target_modules_count_once():
    def targets(*names):
        return estimate_memory("tiny", "lora", 2, 64, target_modules=list(names), device="cpu")

    once, twice = targets("q_proj", "v_proj"), targets("q_proj", "v_proj", "q_proj")
    assert twice.as_dict() == once.as_dict()
    three = targets("q_proj", "v_proj", "k_proj")
    assert once.trainable_params < three.trainable_params


def test_a_preset_and_its_config_give_one_estimate():
    by_name = estimate_memory("tiny", "qlora", 2, 64, device="cpu")
    by_config = estimate_memory(ModelConfig.from_name("tiny"), "qlora", 2, 64, device="cpu")
    assert by_name.as_dict() == by_config.as_dict()
    assert by_name.settings["model"] == "tiny"


def test_seq_len_up_to_the_model_limit():
    assert estimate_memory("tiny", "lora", 1, 256).total > estimate_memory("tiny", "lora", 1, 255).total


# ---- the estimate is the real step ----------------------------------------------------------------
REAL_CASES = {  # name: (method, estimate_memory keywords)
    "lora-two-targets-padded": ("lora", dict(r=8, target_modules=["q_proj", "v_proj"])),
    "qlora-checkpointed-8bit": ("qlora", dict(optimizer="adamw8bit", gradient_checkpointing=True,
                                              attention_mask=False)),
    "full-paged-no-budget": ("full", dict(optimizer="paged_adamw8bit", paged_device_budget=0)),
    "lora-bf16-adapters-chunked": ("lora", dict(adapter_dtype=torch.bfloat16, loss_chunk_size=32)),
}


@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_the_cpu_estimate_is_the_tracked_real_step(name):
    """estimate_memory(device="cpu") against the same step on real tensors under the tracker:
    every category, the peak, host bytes, the moment and the simulated reserved bytes agree."""
    method, kw = REAL_CASES[name]
    est = small(method, **kw)
    kw = dict(kw)
    step = {k: kw.pop(k) for k in ("r", "target_modules", "adapter_dtype") if k in kw}
    padded = kw.pop("attention_mask", True)
    real = trace_step(SMALL, TrainConfig(method=method, **kw), batch_size=2, seq_len=64, device="cpu",
                      padded=padded, fake=False, **step)
    got, want = est.as_dict(), real.report.as_dict()
    for key in CATEGORIES + ("host",):
        assert got[key] == want[key], (key, got, want)
    assert est.total == real.report.peak and est.moment == real.report.moment
    assert (est.reserved, est.reserved_expandable) == (real.reserved, real.reserved_expandable)


# ---- what an estimate carries ----------------------------------------------------------------------
MOMENT = re.compile(r"forward in [\w.]+, aten\.\w+\.\w+"
                    r"|backward, recomputing [\w.]+, aten\.\w+\.\w+"
                    r"|backward, aten\.\w+\.\w+( \(last forward: [\w.]+\))?"
                    r"|optimizer step, aten\.\w+\.\w+")


@pytest.mark.parametrize("method, kw", [
    ("lora", dict(device="cpu")),
    ("full", dict(optimizer="adamw8bit", device="cpu")),
    ("full", dict(optimizer="adamw8bit", device="cuda")),
    ("qlora", dict(gradient_checkpointing=True, activation_offload=True, device="cuda")),
    ("lora", dict(world_size=2, device="cuda")),
])
def test_reserved_covers_the_peak_and_the_moment_is_named(method, kw):
    est = estimate_memory(SMALL, method, 2, 64, **kw)
    # the caching allocator holds every live block in segments of whole 2 MiB pages
    for reserved in (est.reserved, est.reserved_expandable):
        assert reserved >= est.total > 0 and reserved % 2**21 == 0, (reserved, est.total)
    assert isinstance(est.moment, str) and MOMENT.fullmatch(est.moment), est.moment
    assert est.as_dict()["moment"] == est.moment and f"peak: {est.moment}" in est.table()


def test_the_table_lists_the_categories_and_reserved():
    table = small().table()
    for row in CATEGORIES + ("total", "reserved"):
        assert f"| {row} |" in table, row
    assert "| host (apart from the peak) | 0 B |" in table


@pytest.mark.parametrize("method, args, fields", [
    ("lora", {}, {}),
    ("full", dict(optimizer="paged_adamw8bit"),
     dict(paged_device_budget=None, loss_chunk_size=None, grad_accum=2)),
    ("qlora", dict(gradient_checkpointing=True),
     dict(activation_offload=True, mlp_tile_size=64, objective="dpo", bf16=False, dpo_beta=0.2)),
    ("full", dict(world_size=2, parallel="ddp"), dict(weight_decay=0.1, optimizer_in_backward=False)),
    ("lora", dict(world_size=2), dict(max_grad_norm=None, neftune_alpha=5.0)),
])
def test_the_traced_train_config_reads_back(method, args, fields):
    """settings["train_config"] is the TrainConfig the step ran with, as a user writes it."""
    est = estimate_memory("tiny", method, 1, 32, device="cpu", **args, **fields)
    text = est.settings["train_config"]
    config = eval(text, {"TrainConfig": TrainConfig})  # noqa: S307 - the names `from minift import *` gives
    want = TrainConfig(method=method, optimizer=args.get("optimizer", "adamw"),
                       gradient_checkpointing=args.get("gradient_checkpointing", False),
                       parallel=args.get("parallel"), fsdp_cpu_offload=args.get("cpu_offload", False),
                       **fields)
    assert config == want, text
    # only what differs from the defaults is written
    fields_of = [f.name for f in dataclasses.fields(TrainConfig)
                 if f.name not in ("method", "micro_batch_size", "max_length")]
    assert text.count("=") == 1 + sum(getattr(want, f) != getattr(TrainConfig(method=method), f)
                                      for f in fields_of)


def test_the_default_train_config_is_written_bare():
    assert estimate_memory("tiny", seq_len=32).settings["train_config"] == "TrainConfig(method='lora')"


def test_checkpointing_and_batch_size():
    base = small()
    assert small(gradient_checkpointing=True).activations < base.activations / 2
    assert small(batch_size=4).activations > 1.8 * base.activations
    assert small(batch_size=4).total > base.total


def test_a_grpo_estimate_is_the_largest_stage_of_the_grpo_trace():
    from minift.planning.grpo_memory import trace_grpo_step
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    est = estimate_memory(cfg, "lora", batch_size=2, seq_len=8, r=4, objective="grpo", grpo_group_size=4,
                          grpo_max_new_tokens=16, gradient_checkpointing=True, device="cpu")
    trace = trace_grpo_step(cfg, TrainConfig(method="lora", objective="grpo", grpo_group_size=4,
                                             grpo_max_new_tokens=16, gradient_checkpointing=True),
                            prompts=2, prompt_len=8, r=4, device="cpu")
    assert est.total == trace.peak and est.settings["peak_stage"] == trace.peak_stage
    assert set(est.settings["stages"]) == {"rollout", "scoring", "update"}
    assert est.moment.startswith(trace.peak_stage + ": ")
    assert "objective='grpo'" in est.settings["train_config"] and est.reserved >= est.total
    with pytest.raises(ValueError, match="world_size=1"):
        estimate_memory(cfg, "lora", objective="grpo", world_size=2)
