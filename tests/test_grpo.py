"""GRPO's loss against numbers worked by hand, its gradient against autograd on the direct
formula, the chunked per-token log-probs, the rollouts' masking, and the torchrun pieces that need
no process group: the prompts dealt out to ranks, blank batches, the shared stop of decoding."""
import math

import pytest
import torch

import minift
from minift.distributed.parallel import Shard
from minift.models.config import ModelConfig
from minift.names import IGNORE_INDEX
from minift.objectives.grpo import (
    GRPOObjective,
    blank_prompts,
    completions,
    eval_share,
    group_advantages,
    grpo_loss,
    prompt_batches,
    prompt_rows,
    rank_seed,
    ranks_ended,
    split_prompts,
    token_logps,
)
from minift.objectives.loss import chunked_token_logps
from minift.objectives.reference import AdapterReference


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


# ---- under torchrun: the pieces that need no process group ----------------------------------
def test_split_prompts_deals_out_whole_batches_or_prompts():
    rows = prompt_rows([{"input_ids": list(range(3, 4 + i % 3))} for i in range(7)], None, "rows")
    group = prompt_batches(rows, 3, pad_id=0, seed=1)  # 3 + 3 + 1 prompts
    assert [len(b["rows"]) for b in group] == [3, 3, 1]
    # micro-batches that divide go whole, with their own seeds: one process's rollouts
    assert split_prompts(group[:2], 1, 2) == [group[1]] and split_prompts(group, 0, 1) is group
    parts = [split_prompts(group, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]  # as many micro-batches (forwards) on every rank
    for batch, rank0, rank1 in zip(group, *parts):
        assert rank0["row_index"] == batch["row_index"][0::2]
        seed = batch["sample_seed"]
        assert rank0["sample_seed"] == rank_seed(seed, 0) != rank_seed(seed, 1) == rank1["sample_seed"]
        for part in (rank0, rank1):  # a rank's share is the batch of its prompts, padding trimmed
            if not part.get("blank"):
                alone = prompt_batches([rows[i] for i in part["row_index"]], 3, shuffle=False)[0]
                assert torch.equal(part["input_ids"], alone["input_ids"])
                assert torch.equal(part["attention_mask"], alone["attention_mask"])
    assert [p["row_index"] for p in parts[1][:2]] == [group[0]["row_index"][1:2], group[1]["row_index"][1:2]]
    blank = parts[1][2]  # the epoch's last prompt went to rank 0; rank 1 runs a blank batch
    assert blank["blank"] and blank["row_index"] == group[2]["row_index"]
    counted = sum(completions(b, 4) for p in parts for b in p)
    assert counted == sum(completions(b, 4) for b in group) == 28 and completions(blank, 4) == 0
    shares = [eval_share(group, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2] and shares[0] == group[0::2] and shares[1][1]["blank"]


def early_ending_model():
    torch.manual_seed(0)
    # half the vocabulary ends a row: most rows end within a few tokens, at different tokens
    return minift.Llama(ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    eos_token_id=[2, 7, 8, 9, 10, 11, 12, 13]))


def test_generation_stops_when_the_stop_rule_says():
    """``stop`` sees "every row has ended" after each token; a rule that waits for another rank
    (here: never ends) decodes on with pad tokens and leaves the rows' tokens as they were."""
    model = early_ending_model()
    prompt = torch.tensor([[3, 4, 5], [6, 3, 4]])
    seen = []
    alone = minift.generate(model, prompt, 12, temperature=1.0, pad_token_id=0,
                            generator=torch.Generator().manual_seed(0),
                            stop=lambda ended: seen.append(bool(ended)) or bool(ended))
    assert alone.shape[1] - 3 == len(seen) < 12 and seen[-1] and not any(seen[:-1])  # it stopped early
    plain = minift.generate(model, prompt, 12, temperature=1.0, pad_token_id=0,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, alone)  # the default rule: this batch's own flag
    waiting = minift.generate(model, prompt, 12, temperature=1.0, pad_token_id=0,
                              generator=torch.Generator().manual_seed(0), stop=lambda ended: False)
    assert waiting.shape[1] == 3 + 12
    assert torch.equal(waiting[:, :alone.shape[1]], alone) and (waiting[:, alone.shape[1]:] == 0).all()


def test_ranks_ended_asks_every_rank():
    """The stop rule of a sharded step, with a fake Shard whose sum adds another rank's flag."""
    class TwoRanks:
        def __init__(self, other_running):
            self.other = other_running

        def sum(self, value):
            return value + self.other

    assert ranks_ended(TwoRanks(0.0))(torch.tensor(True)) is True
    assert ranks_ended(TwoRanks(1.0))(torch.tensor(True)) is False  # the other rank still decodes
    assert ranks_ended(TwoRanks(0.0))(torch.tensor(False)) is False


def _policy():
    model = minift.lora_wrap(early_ending_model(), r=4, alpha=8, exclude=())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def _objective(model, calls):
    def reward(prompts, completions, rows):
        calls.append(len(completions))
        return [sum(t in (3, 4, 5, 6) for t in c) / len(c) for c in completions]
    return GRPOObjective(AdapterReference(model), reward, group_size=4, max_new_tokens=6, loss_chunk_size=5)


def test_a_blank_batch_adds_nothing_and_the_sharded_step_is_the_plain_one():
    """The torchrun code path on one process (a 1-rank Shard) with a blank batch added equals the
    plain step: loss, metrics, gradients; the blank batch's completions are never scored."""
    rows = prompt_rows([{"input_ids": [3 + i, 4, 6][:1 + i % 3]} for i in range(5)], None, "rows")
    group = prompt_batches(rows, 3, pad_id=0, seed=2)
    results = []
    for shard, batches in ((None, group), (Shard(0, 1, "cpu"), group + [blank_prompts(group[0], 7)])):
        model, calls = _policy(), []
        loss, trained, extra = _objective(model, calls).step(model, batches, "cpu", shard=shard)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((float(loss), trained, {k: float(v) for k, v in extra.items()}, grads, calls))
    (l1, t1, e1, g1, c1), (l2, t2, e2, g2, c2) = results
    assert c1 == c2 == [12, 8]  # the blank batch's 4 completions were not scored
    assert (l2, t2, e2["completions"]) == (l1, t1, 20) and e1["reward_std"] > 0 and e1["kl"] > 0
    assert e2 == pytest.approx(e1, rel=1e-12, abs=0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_metrics_are_the_means_over_completions():
    """reward mean / std (Bessel), KL, clip fraction and length from the step's sums equal the
    statistics of the completions' own numbers."""
    model, rows = _policy(), prompt_rows([{"input_ids": [3 + i, 4]} for i in range(3)], None, "rows")
    batch = prompt_batches(rows, 3, pad_id=0, shuffle=False)[0]
    objective = _objective(model, [])
    _, kl, clipped, rewards, lengths = objective.batch_terms(model, batch, torch.device("cpu"))
    model.zero_grad()
    _, trained, extra = objective.step(model, [batch], "cpu")
    assert trained == int(lengths.sum())
    want = {"reward_mean": rewards.double().mean(), "reward_std": rewards.double().std(),
            "kl": kl.double().mean(), "clip_fraction": clipped.double().mean(),
            "completion_length": lengths.double().mean()}
    for key, value in want.items():
        assert float(extra[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-12), key


def test_sharded_evaluation_on_one_process_is_the_plain_one():
    model, rows = _policy(), prompt_rows([{"input_ids": [3 + i, 4]} for i in range(5)], None, "rows")
    config = minift.TrainConfig(micro_batch_size=2, bf16=False, device="cpu")
    objective = _objective(model, [])
    plain = objective.evaluate(model, rows, config, "cpu")
    assert objective.evaluate(model, rows, config, "cpu", shard=Shard(0, 1, "cpu")) == plain
    assert 0 <= plain["eval_reward"] == -plain["eval_loss"] <= 1 and 1 <= plain["eval_completion_length"] <= 6
