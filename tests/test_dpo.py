"""minift/objectives/dpo.py against the paper's formula computed one sequence at a time, and the references."""
import copy

import pytest
import torch
import torch.nn.functional as F

import minift
from minift.data.preference import collate_pairs
from minift.models.config import ModelConfig
from minift.objectives.dpo import (
    AdapterReference,
    DPOObjective,
    ModelReference,
    StoredReference,
    dpo_loss,
    precompute_reference,
    sequence_logps,
)

BETA = 0.3


def random_pairs(n, vocab=256, seed=0):
    """Pairs of different lengths sharing their prompt; replies scored, prompts not."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (3 + i % 3,), generator=g).tolist()
        pair = {}
        for half, length in (("chosen", 2 + i % 4), ("rejected", 3 + (i * 2) % 3)):
            reply = torch.randint(3, vocab, (length,), generator=g).tolist()
            pair[f"{half}_ids"] = prompt + reply
            pair[f"{half}_labels"] = [-100] * len(prompt) + reply
        pairs.append(pair)
    return pairs


def tiny_policy():
    """(LoRA policy whose adapters are non-zero, its base as a separate frozen copy)."""
    base = minift.Llama(ModelConfig.from_name("tiny"))
    frozen = copy.deepcopy(base)
    policy = minift.lora_wrap(base, r=4, alpha=8)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: the policy differs from its base
    return policy, frozen


def paper_logp(model, ids, labels):
    """log pi(y|x): one unpadded sequence, sum over reply positions t of log softmax(z_{t-1})[y_t]."""
    logits = model(torch.tensor([ids]))[0]
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            total = total + torch.log_softmax(logits[t - 1].double(), -1)[ids[t]]
    return total


def paper_loss(policy, reference, pairs, beta):
    """Eq. 7 of Rafailov et al. 2023, averaged over pairs, written out term by term."""
    losses = []
    for p in pairs:
        with torch.no_grad():
            ref_w = paper_logp(reference, p["chosen_ids"], p["chosen_labels"])
            ref_l = paper_logp(reference, p["rejected_ids"], p["rejected_labels"])
        pol_w = paper_logp(policy, p["chosen_ids"], p["chosen_labels"])
        pol_l = paper_logp(policy, p["rejected_ids"], p["rejected_labels"])
        margin = beta * ((pol_w - ref_w) - (pol_l - ref_l))
        losses.append(-torch.log(torch.sigmoid(margin)))
    return torch.stack(losses).mean()


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_the_paper_formula():
    policy, frozen = tiny_policy()
    pairs = random_pairs(4)
    expected = paper_loss(policy, frozen, pairs, BETA)
    expected.backward()
    want = lora_grads(policy)
    policy.zero_grad(set_to_none=True)
    objective = DPOObjective(ModelReference(frozen), beta=BETA)
    # two micro-batches of one step (3 + 1 pairs, right-padded): the mean is over all 4 pairs
    micro = [collate_pairs(pairs[:3], 0, range(3)), collate_pairs(pairs[3:], 0, [3])]
    loss, n, metrics = objective.step(policy, micro, torch.device("cpu"))
    metrics = {k: float(v) for k, v in metrics.items()}  # means stay on the device until the loop reads them
    assert metrics["pairs"] == 4
    assert n == sum(sum(t != -100 for t in p[f"{h}_labels"]) for p in pairs for h in ("chosen", "rejected"))
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    got = lora_grads(policy)
    assert set(got) == set(want) and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-4, atol=1e-6)
    assert 0.0 <= metrics["reward_accuracy"] <= 1.0
    assert metrics["reward_margin"] == pytest.approx(metrics["chosen_reward"]
                                                     - metrics["rejected_reward"], abs=1e-9)


def test_rewards_and_accuracy_follow_the_log_ratios():
    pc, pr = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-3.0, -4.0, -2.5])
    rc, rr = torch.tensor([-2.0, -4.0, -2.0]), torch.tensor([-2.0, -4.0, -2.0])
    losses, cw, rw = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(cw, torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(rw, torch.tensor([-0.5, 0.0, -0.25]))
    torch.testing.assert_close(losses, -F.logsigmoid(cw - rw))
    assert (cw > rw).tolist() == [True, False, True]


def test_ipo_is_the_squared_distance_of_length_averaged_log_ratios():
    pc, pr = torch.tensor([-4.0, -1.0]), torch.tensor([-9.0, -2.0])
    rc, rr = torch.tensor([-6.0, -1.0]), torch.tensor([-6.0, -1.5])
    counts = (torch.tensor([2, 1]), torch.tensor([3, 2]))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo", counts=counts)
    h0 = (-4 + 6) / 2 - (-9 + 6) / 3  # = 2
    h1 = (-1 + 1) / 1 - (-2 + 1.5) / 2  # = 0.25
    torch.testing.assert_close(losses, torch.tensor([(h0 - 2) ** 2, (h1 - 2) ** 2]))
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_sequence_logps_sum_only_labelled_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 6, 2]])
    logps, counts = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logps, torch.stack([lp[0, 0, 3] + lp[0, 1, 1],
                                                   lp[1, 1, 6] + lp[1, 2, 2]]))
    assert counts.tolist() == [2, 2]


def test_adapter_disabled_reference_equals_a_frozen_copy_bit_for_bit():
    policy, frozen = tiny_policy()
    batch = collate_pairs(random_pairs(4, seed=3), 0)
    policy.train()
    got = AdapterReference(policy).logps(batch, torch.device("cpu"))
    want = ModelReference(frozen).logps(batch, torch.device("cpu"))
    assert torch.equal(got, want)
    # the adapters are back on afterwards and in train mode: the policy is not its base
    assert policy.training and all(m.enabled for _, m in minift.lora.layer.lora_layers(policy))
    with torch.no_grad():
        on = sequence_logps(policy(batch["input_ids"], batch["attention_mask"]), batch["labels"])[0]
    assert not torch.allclose(on, want)


def test_adapter_reference_needs_lora():
    with pytest.raises(ValueError, match="needs a LoRA-wrapped model"):
        AdapterReference(minift.Llama(ModelConfig.from_name("tiny")))


def test_nf4_frozen_copy_is_quantized_and_close():
    _, frozen = tiny_policy()
    batch = collate_pairs(random_pairs(2), 0)
    exact = ModelReference(frozen).logps(batch, torch.device("cpu"))
    ref = ModelReference.copy_of(frozen, nf4=True)
    assert ref.kind == "frozen_copy_nf4"
    assert any(isinstance(m, minift.NF4Linear) for m in ref.model.modules())
    assert not any(isinstance(m, minift.NF4Linear) for m in frozen.modules())  # original kept
    approx = ref.logps(batch, torch.device("cpu"))
    assert not torch.equal(approx, exact)
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.05)


def test_precomputed_reference_is_stored_reused_and_recomputed_for_other_data(tmp_path):
    policy, frozen = tiny_policy()
    pairs, path = random_pairs(5), tmp_path / "ref.safetensors"
    precompute_reference(ModelReference(frozen), pairs, path, batch_size=2)
    batch = collate_pairs(pairs, 0)
    want = ModelReference(frozen).logps(batch, torch.device("cpu")).double()
    got = StoredReference().logps(batch, torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    class Refuses:
        def logps(self, *args):
            raise AssertionError("the stored file should have been read")

    again = [dict((k, v) for k, v in p.items() if k != "ref_logps") for p in pairs]
    precompute_reference(Refuses(), again, path)
    assert [p["ref_logps"] for p in again] == [p["ref_logps"] for p in pairs]
    other = random_pairs(5, seed=9)
    with pytest.raises(AssertionError, match="should have been read"):
        precompute_reference(Refuses(), other, path)  # another data set is never read from disk
    with pytest.raises(ValueError, match="no 'ref_logps'"):
        StoredReference().logps(collate_pairs(other, 0), torch.device("cpu"))


def test_stored_reference_gives_the_same_step_as_the_live_one():
    policy, frozen = tiny_policy()
    pairs = random_pairs(4)
    live = DPOObjective(AdapterReference(policy), beta=BETA)
    loss_live, _, m_live = live.step(policy, [collate_pairs(pairs, 0)], torch.device("cpu"))
    grads_live = lora_grads(policy)
    policy.zero_grad(set_to_none=True)
    precompute_reference(ModelReference(frozen), pairs)
    stored = DPOObjective(StoredReference(), beta=BETA)
    loss_stored, _, m_stored = stored.step(policy, [collate_pairs(pairs, 0)], torch.device("cpu"))
    torch.testing.assert_close(loss_stored, loss_live, rtol=1e-5, atol=1e-6)
    for name, g in lora_grads(policy).items():
        torch.testing.assert_close(g, grads_live[name], rtol=1e-4, atol=1e-6)
    assert float(m_stored["reward_accuracy"]) == float(m_live["reward_accuracy"])


def test_evaluate_reports_loss_and_accuracy_in_eval_mode():
    policy, frozen = tiny_policy()
    pairs = random_pairs(6)
    objective = DPOObjective(ModelReference(frozen), beta=BETA)
    config = minift.TrainConfig(micro_batch_size=4, pad_id=0, bf16=False)
    result = objective.evaluate(policy, pairs, config, "cpu")
    expected = paper_loss(policy.eval(), frozen, pairs, BETA)
    assert result["eval_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert {"eval_reward_accuracy", "eval_reward_margin", "eval_chosen_logp"} <= set(result)


def test_sft_weight_adds_the_chosen_per_token_nll():
    policy, frozen = tiny_policy()
    pairs = random_pairs(3)
    batch = collate_pairs(pairs, 0)
    plain = DPOObjective(ModelReference(frozen), beta=BETA)
    rpo = DPOObjective(ModelReference(frozen), beta=BETA, sft_weight=0.5)
    with torch.no_grad():
        base, _, _, logps = plain.pair_terms(policy, batch, torch.device("cpu"))
        with_nll, _, _, _ = rpo.pair_terms(policy, batch, torch.device("cpu"))
    lengths = torch.tensor([sum(t != -100 for t in p["chosen_labels"]) for p in pairs])
    torch.testing.assert_close(with_nll, base - 0.5 * logps[:3] / lengths)
    with pytest.raises(ValueError, match="dpo_sft_weight"):
        DPOObjective(StoredReference(), sft_weight=-1)


@pytest.mark.parametrize("beta, loss_type, words", [
    (0.0, "sigmoid", "dpo_beta must be a finite number > 0"),
    (float("nan"), "sigmoid", "dpo_beta"), (0.1, "orpo", "dpo_loss_type must be one of")])
def test_objective_checks_its_settings(beta, loss_type, words):
    with pytest.raises(ValueError, match=words):
        DPOObjective(StoredReference(), beta=beta, loss_type=loss_type)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_log_probs_equal_the_full_logits(method, chunk):
    """model_logps a chunk of tokens at a time: the same per-row sums and counts, and the same
    gradients (lm_head's too for full fine-tuning) for a per-row weighting of them."""
    from minift.objectives.dpo import model_logps
    torch.manual_seed(0)
    model = minift.Llama(ModelConfig.from_name("tiny"))
    if method == "lora":
        policy, _ = tiny_policy()
        model = policy
    batch = collate_pairs(random_pairs(3), 0)
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.7])
    got = {}
    for c in (None, chunk):
        model.zero_grad(set_to_none=True)
        logps, counts = model_logps(model, batch, torch.device("cpu"), chunk=c)
        (logps * weights).sum().backward()
        got[c] = (logps.detach(), counts, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (want, want_n, want_g), (mine, mine_n, mine_g) = got[None], got[chunk]
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine_n, want_n)
    assert mine_g.keys() == want_g.keys() and len(want_g) > 0
    assert ("lm_head.weight" in want_g) == (method == "full")
    for name in want_g:
        # chunks sum the gradient in another order: on an AVX2 CPU one lm_head element of 16,384
        # differed by 1.4e-6 (1-token chunks), so gradients get the log-probs' absolute 1e-5
        torch.testing.assert_close(mine_g[name], want_g[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the reference's pass: no graph, the same values
        torch.testing.assert_close(model_logps(model, batch, torch.device("cpu"), chunk=chunk)[0], want,
                                   rtol=1e-5, atol=1e-5)
