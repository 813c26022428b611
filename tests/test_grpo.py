"""GRPO's loss against numbers worked by hand, its gradient against autograd on the direct
formula, the chunked per-token log-probs, and the rollouts' masking."""
import math

import pytest
import torch

import minift
from minift.models.config import ModelConfig
from minift.names import IGNORE_INDEX
from minift.objectives.grpo import (
    GRPOObjective,
    group_advantages,
    grpo_loss,
    prompt_batches,
    prompt_rows,
    token_logps,
)
from minift.objectives.loss import chunked_token_logps


def test_group_advantages_by_hand():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3); group 2 all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(rewards, 4, eps=1e-4)
    s = math.sqrt((4 * 0.25) / 3)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(want, rel=1e-6)


def test_loss_on_a_toy_case_by_hand():
    # two completions; tokens 0..2, the last of the first completion masked out
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.4, 0.8]]))
    old = torch.log(torch.tensor([[0.4, 0.25, 0.3], [0.2, 0.5, 0.8]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3], [0.4, 0.4, 0.4]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    losses, kl, clipped = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    # completion 1: ratios 1.25 (clipped to 1.2 since A > 0), 1.0; k3 with ref/pi = 0.5 and 2:
    # 0.5 - ln 0.5 - 1 = 0.193147..., 2 - ln 2 - 1 = 0.306853...
    k_a, k_b = 0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1
    l1 = (-(1.2 * 1.0) + 0.1 * k_a + -(1.0) + 0.1 * k_b) / 2
    # completion 2: ratios 1, 0.8 (min(0.8 * -2, 0.8 * -2) = -1.6: at the edge, not clipped), 1;
    # ref/pi = 2, 1, 0.5
    k_c, k_e = 2 - math.log(2) - 1, 0.5 - math.log(0.5) - 1
    l2 = ((2.0 + 0.1 * k_c) + (1.6 + 0.0) + (2.0 + 0.1 * k_e)) / 3
    assert losses.tolist() == pytest.approx([l1, l2], rel=1e-6)
    assert kl.tolist() == pytest.approx([(k_a + k_b) / 2, (k_c + 0 + k_e) / 3], rel=1e-6)
    assert clipped.tolist() == pytest.approx([0.5, 0.0])


def test_gradient_matches_autograd_on_the_direct_formula():
    torch.manual_seed(0)
    n, t = 3, 5
    base = torch.randn(n, t)
    old = base + 0.3 * torch.randn(n, t)
    ref = base + 0.5 * torch.randn(n, t)
    adv = torch.tensor([0.7, -1.2, 0.4])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    x = base.clone().requires_grad_(True)
    grpo_loss(x, old, ref, adv, mask, 0.2, 0.04)[0].mean().backward()
    y = base.clone().requires_grad_(True)
    total = 0
    for i in range(n):  # token by token, as the paper writes it
        terms = []
        for j in range(t):
            if mask[i, j]:
                r = torch.exp(y[i, j] - old[i, j])
                surr = torch.min(r * adv[i], torch.clamp(r, 0.8, 1.2) * adv[i])
                d = ref[i, j] - y[i, j]
                terms.append(-(surr - 0.04 * (torch.exp(d) - d - 1)))
        total = total + sum(terms) / len(terms)
    (total / n).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_ratio_one_keeps_the_policy_gradient():
    # logp_old = logp detached: ratio 1 in value, gradient -A * dlogp / count (beta 0)
    x = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    grpo_loss(x, x.detach(), None, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.0)[0].sum().backward()
    assert x.grad.tolist() == [[-1.0, -1.0]]


def tiny(vocab=16):
    torch.manual_seed(0)
    return minift.Llama(ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))


def test_chunked_token_logps_equal_log_softmax_and_its_gradient():
    model = tiny()
    ids = torch.randint(0, 16, (2, 7))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    hidden = model(ids, return_hidden=True)
    got = chunked_token_logps(hidden, model.lm_head, labels, chunk_size=3)
    logits = model.lm_head(hidden).float()
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    want = torch.cat([want, torch.zeros(2, 1)], 1) * (labels.roll(-1, 1) != IGNORE_INDEX)
    want[:, -1] = 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(2, 7)
    g1 = torch.autograd.grad((got * w).sum(), model.lm_head.weight)[0]
    hidden = model(ids, return_hidden=True)
    full = token_logps(model, ids, torch.ones_like(ids), labels, chunk=None)
    g2 = torch.autograd.grad((full * w).sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_rollouts_are_masked_after_eos_and_grouped():
    model = tiny()
    rows = prompt_rows([{"input_ids": [3, 4, 5], "answer": "x"}, {"input_ids": [6]}], None, "rows")
    seen = {}

    def reward(prompts, completions, rows):
        seen.update(prompts=prompts, completions=completions, rows=rows)
        return [float(len(c)) for c in completions]

    obj = GRPOObjective(None, reward, group_size=3, max_new_tokens=6, kl_beta=0.0, eos_token_id=2, pad_id=0)
    batch = prompt_batches(rows, 2, pad_id=0, shuffle=False)[0]
    r = obj.rollout(model, batch, torch.device("cpu"))
    assert r["input_ids"].shape[0] == 6 and len(seen["completions"]) == 6
    assert [row.get("answer") for row in seen["rows"]] == ["x"] * 3 + [None] * 3
    width = batch["input_ids"].shape[1]
    for ids, labels, length, text in zip(r["input_ids"], r["labels"], r["lengths"], seen["completions"]):
        comp = ids[width:].tolist()
        kept = comp[:comp.index(2) + 1] if 2 in comp else comp
        assert labels[width:width + len(kept)].tolist() == kept
        assert (labels[width + len(kept):] == IGNORE_INDEX).all() and (labels[:width] == IGNORE_INDEX).all()
        assert int(length) == len(kept) == len(text)
    assert r["rewards"].tolist() == [float(x) for x in r["lengths"].tolist()]
    again = obj.rollout(model, batch, torch.device("cpu"))  # the batch's seed fixes the samples
    assert torch.equal(again["input_ids"], r["input_ids"])


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="grpo_group_size"):
        GRPOObjective(None, lambda *a: [], group_size=1)
    with pytest.raises(ValueError, match="reward_fn"):
        GRPOObjective(None, None)
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        prompt_rows([{"text": "hi"}], None, "rows")


def test_rule_rewards_and_combine():
    from minift.objectives import rewards as R
    rows = [{"answer": "42"}, {"answer": "7"}, {"answer": "x"}]
    comps = [" 42\n", "seven", '{"a": 1}']
    assert R.exact_match()(None, comps, rows) == [1.0, 0.0, 0.0]
    assert R.regex_match(r"\d+")(None, comps, rows) == [1.0, 0.0, 1.0]
    assert R.json_parses()(None, comps, rows) == [1.0, 0.0, 1.0]  # " 42\n" is JSON
    assert R.length_penalty(4)(None, comps, rows) == [0.0, -0.25, -1.0]
    both = R.combine(R.exact_match(), (R.length_penalty(4), 0.5))
    assert both(None, comps, rows) == [1.0, -0.125, -0.5]
    with pytest.raises(ValueError, match="row 0 has no 'answer'"):
        R.exact_match()(None, ["a"], [{}])
