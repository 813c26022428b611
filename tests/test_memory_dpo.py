"""The DPO step through estimate_memory(objective="dpo") and estimate_dpo_memory: two sequences a
pair, the reference's log-probs (adapters off for LoRA and QLoRA, a frozen copy for full
fine-tuning), against the step on real tensors."""
import dataclasses

import pytest
import torch.distributed as dist

from minift import TrainConfig, estimate_memory
from minift.memory.report import CATEGORIES
from minift.planning.agreement import model_config
from minift.planning.estimate import estimate_dpo_memory
from minift.planning.trace import trace_step

SMALL = model_config()  # 3 layers, hidden 128, 4 query / 2 key-value heads, vocabulary 512

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def dpo(method="lora", pairs=2, seq_len=64, cfg=SMALL, **kw):
    kw.setdefault("device", "cpu")
    return estimate_dpo_memory(cfg, method, pairs, seq_len, **kw)


def sft(method="lora", batch_size=2, seq_len=64, **kw):
    kw.setdefault("device", "cpu")
    return estimate_memory(SMALL, method, batch_size, seq_len, **kw)


def test_estimate_dpo_memory_is_the_estimate_of_the_dpo_objective():
    kw = dict(r=8, gradient_checkpointing=True, device="cpu")
    est = estimate_dpo_memory(SMALL, "qlora", 2, 64, **kw)
    assert est.as_dict() == estimate_memory(SMALL, "qlora", 2, 64, objective="dpo", **kw).as_dict()
    assert est.settings["objective"] == "dpo"
    assert est.settings["train_config"] == ("TrainConfig(method='qlora', gradient_checkpointing=True, "
                                            "objective='dpo')")


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_dpo_step_holds_more_than_the_sft_step_of_its_sequences(method):
    pairs, sequences, same_batch = dpo(method), sft(method, batch_size=4), sft(method, batch_size=2)
    assert pairs.total > sequences.total > same_batch.total
    assert pairs.activations > 1.8 * same_batch.activations  # a chosen and a rejected sequence a pair
    for key in ("trainable_params", "gradients", "optimizer_states"):
        assert getattr(pairs, key) == getattr(same_batch, key), key


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_adapter_reference_adds_no_weights(method):
    assert dpo(method).frozen_weights == sft(method).frozen_weights > 0


def test_full_fine_tuning_counts_the_reference_copy():
    copy, nf4, plain = dpo("full"), dpo("full", dpo_reference="copy_nf4"), sft("full")
    assert plain.frozen_weights == 0
    assert copy.frozen_weights == plain.trainable_params  # a whole second bf16 model
    # the NF4 copy is stored as QLoRA stores its base
    assert nf4.frozen_weights == sft("qlora").frozen_weights < copy.frozen_weights / 2
    assert nf4.total < copy.total
    assert nf4.trainable_params == copy.trainable_params == plain.trainable_params


def test_chunked_log_probs_lower_the_dpo_peak_at_a_large_vocabulary():
    cfg = dataclasses.replace(SMALL, vocab_size=4096)
    kw = dict(cfg=cfg, seq_len=128, gradient_checkpointing=True)
    full, chunked = dpo(loss_chunk_size=None, **kw), dpo(loss_chunk_size=32, **kw)
    logits = 2 * 2 * 128 * cfg.vocab_size * 4  # the (2B, T, V) float32 logits
    assert full.total - chunked.total > logits
    assert chunked.total < 0.4 * full.total


REAL_CASES = {
    "lora": ("lora", {}),
    "qlora-checkpointed-chunked": ("qlora", dict(gradient_checkpointing=True, loss_chunk_size=32)),
    "full-nf4-reference": ("full", dict(dpo_reference="copy_nf4", loss_chunk_size=None)),
}


@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_the_cpu_dpo_estimate_is_the_tracked_real_step(name):
    method, kw = REAL_CASES[name]
    est = dpo(method, **kw)
    real = trace_step(SMALL, TrainConfig(method=method, objective="dpo", **kw), batch_size=2, seq_len=64,
                      device="cpu", padded=True, fake=False)
    got, want = est.as_dict(), real.report.as_dict()
    for key in CATEGORIES + ("host",):
        assert got[key] == want[key], (key, got, want)
    assert est.total == real.report.peak and est.reserved == real.reserved


def test_lora_dpo_under_fsdp_shards_the_policy():
    one, two = dpo("lora"), dpo("lora", world_size=2)
    assert two.trainable_params * 2 == one.trainable_params
    assert two.frozen_weights * 2 == one.frozen_weights
    assert not dist.is_initialized()


def test_full_dpo_under_fsdp_shards_the_reference_copy():
    one, two = dpo("full"), dpo("full", world_size=2)
    assert two.frozen_weights * 2 == one.frozen_weights


@pytest.mark.parametrize("kw, err, match", [
    (dict(dpo_reference="ema"), ValueError, "dpo_reference must be one of auto, copy_nf4"),
    (dict(precompute_reference=True), ValueError, "precompute_reference scores the pairs before training"),
    (dict(pairs=0), ValueError, "batch_size must be a positive integer, got 0"),
    (dict(dpo_beta=0.0), ValueError, "dpo_beta must be a finite number > 0, got 0.0"),
    (dict(dpo_loss="kto"), ValueError, "dpo_loss must be one of sigmoid, ipo"),
])
def test_bad_dpo_settings_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        dpo(**kw)
