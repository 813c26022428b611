"""minift.train with objective="grpo": the loop, its metrics, the reward rising on a toy task,
the reference per method, resume, and bad input."""
import json

import pytest
import torch

import minift
from minift.lora.layer import lora_state_dict
from minift.models.config import ModelConfig

VOCAB, TARGET = 16, 5


def tiny_model(lora=True):
    torch.manual_seed(0)
    model = minift.Llama(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, eos_token_id=2))
    # the head adapted too: its LoRA gradients come through the chunked per-token log-probs
    return minift.lora_wrap(model, r=4, alpha=8, exclude=()) if lora else model


def share_of_target(prompts, completions, rows):
    """The share of a completion's tokens that are TARGET: rewards the policy for moving mass to it."""
    return [sum(t == TARGET for t in c) / max(len(c), 1) for c in completions]


PROMPTS = [{"input_ids": [3 + i % 7, 4, 6 + i % 5]} for i in range(8)]


def config(tmp_path, **kw):
    base = dict(method="lora", objective="grpo", learning_rate=3e-2, max_steps=4, micro_batch_size=2,
                grad_accum=2, bf16=False, warmup_ratio=0.0, device="cpu", output_dir=str(tmp_path),
                progress=False, lr_scheduler="constant", grpo_group_size=4, grpo_max_new_tokens=6)
    base.update(kw)
    return minift.TrainConfig(**base)


def lines(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_grpo_runs_in_the_loop_and_raises_the_reward(tmp_path):
    summary = minift.train(tiny_model(), PROMPTS, config(tmp_path, max_steps=12), eval_data=PROMPTS[:4],
                           reward_fn=share_of_target)
    log = lines(tmp_path)
    assert log[0]["kl"] == 0.0 and log[0]["clip_fraction"] == 0.0  # fresh adapters: policy == reference
    assert all(line["completions"] == 16 for line in log)
    assert {"reward_mean", "reward_std", "kl", "clip_fraction", "completion_length"} <= set(log[-1])
    assert log[-1]["kl"] > 0
    first = sum(x["reward_mean"] for x in log[:3]) / 3
    last = sum(x["reward_mean"] for x in log[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert summary["objective"] == "grpo" and summary["eval"][-1]["eval_reward"] > 0.2


def test_full_grpo_uses_a_frozen_copy(tmp_path):
    minift.train(tiny_model(lora=False), PROMPTS, config(tmp_path, method="full", max_steps=2,
                                                         learning_rate=1e-3), reward_fn=share_of_target)
    log = lines(tmp_path)
    assert log[0]["kl"] == 0.0 and log[1]["kl"] > 0  # step 2's policy has moved from its copy


def test_a_step_without_any_reward_signal_is_no_dead_model(tmp_path):
    """Every completion scores alike: advantages 0, the fresh adapters' policy equals the reference,
    so the gradient is exactly 0, which is no sign of a dead model in GRPO."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dead-model watch would warn
        minift.train(tiny_model(), PROMPTS, config(tmp_path, max_steps=1, grad_accum=1),
                     reward_fn=lambda p, c, rows: [1.0] * len(c))
    assert lines(tmp_path)[0]["grad_norm"] == 0.0


@pytest.mark.slow
def test_resume_continues_a_grpo_run_exactly(tmp_path):
    whole = tiny_model()
    minift.train(whole, PROMPTS, config(tmp_path / "whole"), reward_fn=share_of_target)
    first = tiny_model()
    minift.train(first, PROMPTS, config(tmp_path / "cut", max_steps=2), reward_fn=share_of_target)
    second = tiny_model()
    minift.train(second, PROMPTS, config(tmp_path / "cut", resume_from="latest"), reward_fn=share_of_target)
    want, got = lora_state_dict(whole), lora_state_dict(second)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    a, b = lines(tmp_path / "whole"), lines(tmp_path / "cut")
    assert [x["reward_mean"] for x in b] == [x["reward_mean"] for x in a]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-6, abs=1e-9)


def test_bad_grpo_input_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="grpo_group_size"):
        config(tmp_path, grpo_group_size=1)
    with pytest.raises(ValueError, match="grpo_clip_eps"):
        config(tmp_path, grpo_clip_eps=1.5)
    with pytest.raises(ValueError, match="grpo_temperature"):
        config(tmp_path, grpo_temperature=0)
    with pytest.raises(ValueError, match="needs reward_fn"):
        minift.train(tiny_model(), PROMPTS, config(tmp_path))
    with pytest.raises(ValueError, match="reward_fn is for objective='grpo'"):
        minift.train(tiny_model(), PROMPTS, config(tmp_path, objective="sft"), reward_fn=share_of_target)
    with pytest.raises(ValueError, match="train_data\\[0\\]"):
        minift.train(tiny_model(), [{"question": "hi"}], config(tmp_path), reward_fn=share_of_target)
    with pytest.raises(ValueError, match="one number per completion"):
        minift.train(tiny_model(), PROMPTS, config(tmp_path), reward_fn=lambda p, c, r: [1.0])


@pytest.mark.slow
def test_example_quick_mode_reports_before_and_after(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train_grpo
    out = tmp_path / "grpo.json"
    # a short SFT run first (the adapter is missing there), then 3 GRPO steps on the SFT model
    result = train_grpo.main(["--quick", "--sft-adapter", str(tmp_path / "sft" / "adapter"), "--sft-steps", "5",
                              "--output-dir", str(tmp_path / "run"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["steps"] == 3 and result["eval_prompts"] == 16 and result["final_kl"] >= 0
    assert result["sft_trained_in_this_run"] and (tmp_path / "sft" / "adapter").exists()
    for when in ("before", "after"):
        assert 0 <= result[when]["exact_match"] <= 1 and result[when]["mean_reward"] <= 1
