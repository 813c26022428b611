"""minift.train with objective="dpo": the shared loop, metrics, references per method, resume."""
import json
import math

import pytest
import torch
from test_dpo import random_pairs

import minift
from minift.lora.layer import lora_state_dict
from minift.models.config import ModelConfig

VOCAB = 64


def tiny_model(lora=True):
    torch.manual_seed(0)
    model = minift.Llama(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1))
    return minift.lora_wrap(model, r=4, alpha=8) if lora else model


def config(tmp_path, **kw):
    base = dict(method="lora", objective="dpo", dpo_beta=0.5, learning_rate=1e-2, max_steps=4,
                micro_batch_size=2, grad_accum=2, bf16=False, warmup_ratio=0.0, device="cpu",
                output_dir=str(tmp_path), progress=False, lr_scheduler="constant")
    base.update(kw)
    return minift.TrainConfig(**base)


def lines(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_lora_dpo_runs_in_the_loop_and_raises_reward_accuracy(tmp_path):
    pairs = random_pairs(8, vocab=VOCAB)
    summary = minift.train(tiny_model(), pairs, config(tmp_path, max_steps=6), eval_data=pairs[:4])
    log = lines(tmp_path)
    # step 1: fresh adapters, so policy == reference (adapters off) and every pair's loss is log 2
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["reward_margin"] == 0.0 and log[0]["reward_accuracy"] == 0.0
    assert all(line["pairs"] == 4 for line in log)
    assert {"chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"} <= set(log[-1])
    assert summary["objective"] == "dpo" and summary["steps"] == 6
    final = summary["eval"][-1]
    assert final["eval_loss"] < math.log(2) and final["eval_reward_accuracy"] > 0.5
    assert (tmp_path / "step-6" / "model.safetensors").is_file()


def test_full_dpo_with_precomputed_reference_equals_the_frozen_copy(tmp_path):
    pairs = random_pairs(6, vocab=VOCAB)
    kw = dict(method="full", max_steps=3, learning_rate=1e-3)
    copy_run = minift.train(tiny_model(lora=False), pairs, config(tmp_path / "copy", **kw))
    pre_run = minift.train(tiny_model(lora=False), [dict(p) for p in pairs],
                           config(tmp_path / "pre", precompute_reference=True, **kw))
    stored = tmp_path / "pre" / "reference_logps.safetensors"
    assert stored.is_file()
    a, b = lines(tmp_path / "copy"), lines(tmp_path / "pre")
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
        assert y["reward_margin"] == pytest.approx(x["reward_margin"], rel=1e-4, abs=1e-6)
    assert pre_run["last_loss"] < math.log(2) and copy_run["last_loss"] < math.log(2)


def test_resume_continues_a_dpo_run_exactly(tmp_path):
    pairs = random_pairs(8, vocab=VOCAB)
    whole = tiny_model()
    minift.train(whole, pairs, config(tmp_path / "whole", max_steps=4))
    first = tiny_model()
    minift.train(first, pairs, config(tmp_path / "cut", max_steps=2))
    second = tiny_model()
    minift.train(second, pairs, config(tmp_path / "cut", max_steps=4, resume_from="latest"))
    want, got = lora_state_dict(whole), lora_state_dict(second)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert [x["loss"] for x in lines(tmp_path / "cut")] == pytest.approx(
        [x["loss"] for x in lines(tmp_path / "whole")], rel=1e-6)


def test_dpo_refuses_sft_examples_and_bad_settings(tmp_path):
    sft = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    with pytest.raises(ValueError, match=r"train_data\[0\] must be a preference pair"):
        minift.train(tiny_model(), sft, config(tmp_path))
    with pytest.raises(ValueError, match="TrainConfig.objective must be one of sft, dpo"):
        config(tmp_path, objective="ppo")
    with pytest.raises(ValueError, match="TrainConfig.dpo_beta"):
        config(tmp_path, dpo_beta=0)
    with pytest.raises(ValueError, match="batching must be 'bucket' with objective='dpo'"):
        config(tmp_path, batching="pack", max_length=32)
    with pytest.raises(TypeError, match="precompute_reference must be True or False"):
        config(tmp_path, precompute_reference="yes")


def test_trained_adapters_as_the_start_warn_that_the_reference_is_the_base(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight").fill_(0.1)
    with pytest.warns(UserWarning, match="reference \\(adapters off\\) is the base model"):
        minift.train(model, random_pairs(2, vocab=VOCAB), config(tmp_path, max_steps=1))


@pytest.mark.parametrize("lora", [True, False])
def test_chunked_log_probs_train_as_the_full_logits(tmp_path, lora):
    """TrainConfig.loss_chunk_size reaches DPO's policy and reference passes; the run is the
    full-logits run up to float rounding."""
    pairs = random_pairs(8, vocab=VOCAB)
    runs = {}
    for chunk in (None, 3):
        kw = {} if lora else dict(method="full", learning_rate=1e-3)
        runs[chunk] = minift.train(tiny_model(lora), pairs, config(tmp_path / str(chunk), loss_chunk_size=chunk,
                                                                   max_steps=3, **kw), eval_data=pairs[:4])
    for key in ("first_loss", "last_loss"):
        assert runs[3][key] == pytest.approx(runs[None][key], rel=1e-5)
    assert runs[3]["eval"][-1]["eval_loss"] == pytest.approx(runs[None]["eval"][-1]["eval_loss"], rel=1e-5)
    assert runs[3]["last_loss"] != runs[3]["first_loss"]


def test_the_tracked_first_step_counts_a_frozen_reference_copy(tmp_path):
    """Full-fine-tuning DPO with a frozen copy: the copy's weights are in the run's memory report
    (as frozen weights); with precomputed log-probs there is no copy to count."""
    pairs = random_pairs(4, vocab=VOCAB)
    weights = sum(p.numel() * p.element_size() for p in tiny_model(False).parameters())
    copy_run = minift.train(tiny_model(False), pairs, config(tmp_path / "copy", method="full", max_steps=1))
    stored = minift.train(tiny_model(False), pairs, config(tmp_path / "stored", method="full", max_steps=1,
                                                           precompute_reference=True))
    assert copy_run["memory"]["frozen_weights"] >= weights
    assert stored["memory"]["frozen_weights"] < weights / 10
    assert copy_run["memory"]["trainable_params"] == stored["memory"]["trainable_params"] == weights


def test_memory_tracker_refuses_a_frozen_entry_that_is_not_a_module():
    from minift.memory.tracker import MemoryTracker
    with pytest.raises(TypeError, match=r"frozen\[0\] must be a torch.nn.Module, got Tensor"):
        MemoryTracker(tiny_model(), frozen=(torch.zeros(1),))
