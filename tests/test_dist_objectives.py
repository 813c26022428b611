"""Evaluation, DPO and GRPO under torchrun: 2 gloo processes against 1-process runs of the same code.

One spawn of 2 CPU processes (the `runs` fixture) runs every case of tests/dist_objectives_cases.py;
the 1-process runs happen in this process. The pieces at the end need no process group.
"""
import copy
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from dist_cases import LOSS_RTOL, WORLD, free_port
from dist_objectives_cases import (
    DPO_CASES,
    GRPO_CASES,
    GRPO_RESUMED,
    RESUMED,
    SFT_EVAL,
    dpo_config,
    grpo_config,
    make_model,
    pairs,
    run_dpo,
    run_grpo,
    sft_eval,
    worker,
)
from safetensors.torch import load_file

from minift.data.preference import collate_pairs, pair_batches
from minift.distributed import parallel as mdist
from minift.objectives.dpo import AdapterReference, DPOObjective, precompute_reference
from minift.objectives.sft import trained_tokens

# what a metrics line of a DPO step holds besides timings
EXACT = ("step", "pairs", "tokens", "trained_tokens", "lr")
CLOSE = ("loss", "grad_norm", "chosen_logp", "rejected_logp", "reward_accuracy", "logp_accuracy",
         "chosen_reward", "rejected_reward", "reward_margin")
EVAL = ("eval_loss", "eval_chosen_logp", "eval_rejected_logp", "eval_reward_accuracy", "eval_logp_accuracy",
        "eval_chosen_reward", "eval_rejected_reward", "eval_reward_margin")
# A reward is beta * (log pi - log pi_ref), the difference of two float32 sums of about -30 here:
# another summation order moves it by a few 1e-7 whatever its size, so rewards (which start at
# 0) are compared to an absolute 1e-5; losses, norms and log-probs to a relative 1e-5.
REWARD_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-objectives")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The DPO runs on one process, no process group."""
    out = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: tiny matrices, a busy 2-core CPU
    try:
        return out, {name: run_dpo(out, name, 1, 0) for name in DPO_CASES}
    finally:
        torch.set_num_threads(threads)


def close(key, got, want):
    if key.endswith(("reward", "margin")):
        return got == pytest.approx(want, rel=0, abs=REWARD_ATOL)
    return got == pytest.approx(want, rel=LOSS_RTOL, abs=1e-12)


def test_ranks_joined(runs):
    _, results = runs
    assert [(r["rank"], r["world"]) for r in results] == [(0, WORLD), (1, WORLD)]


# ---- SFT evaluation -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SFT_EVAL))
def test_sharded_sft_eval_equals_one_process(runs, name):
    _, results = runs
    alone = sft_eval(*SFT_EVAL[name], 1, 0)
    assert alone["forwards"] == 6  # 11 examples in batches of 2
    for r in results:
        got = r["sft_eval"][name]
        # each rank ran half the batches (rank 1: two and a blank one), not all six
        assert got["forwards"] == 3
        assert got["eval_tokens"] == alone["eval_tokens"] > 0
        assert got["eval_loss"] == pytest.approx(alone["eval_loss"], rel=LOSS_RTOL)
        assert got["eval_ppl"] == pytest.approx(alone["eval_ppl"], rel=LOSS_RTOL)
    assert results[0]["sft_eval"][name] == results[1]["sft_eval"][name]  # every rank: the global result


# ---- DPO --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DPO_CASES))
def test_dpo_two_processes_match_one(runs, single, name):
    _, results = runs
    two, one = results[0]["dpo"][name], single[1][name]
    parallel, _, fields = DPO_CASES[name]
    assert [line["step"] for line in two["lines"]] == list(range(1, fields["max_steps"] + 1))
    assert two["lines"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for got, want in zip(two["lines"], one["lines"], strict=True):
        assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}
        for key in CLOSE:
            assert close(key, got[key], want[key]), (got["step"], key, got[key], want[key])
    assert two["lines"][-1]["loss"] != two["lines"][0]["loss"]  # it trained
    s2, s1 = two["summary"], one["summary"]
    assert (s2["world_size"], s2["parallel"], s1["world_size"]) == (WORLD, parallel, 1)
    assert [e["step"] for e in s2["eval"]] == [e["step"] for e in s1["eval"]]
    for got, want in zip(s2["eval"], s1["eval"], strict=True):  # the sharded evaluation
        for key in EVAL:
            assert close(key, got[key], want[key]), (got["step"], key, got[key], want[key])
    # rank 1 computed the same global numbers
    assert results[1]["dpo"][name]["summary"]["eval"] == s2["eval"]
    assert results[1]["dpo"][name]["summary"]["last_loss"] == s2["last_loss"]


def test_dpo_resume_on_two_processes_is_exact(runs):
    out, results = runs
    first, again = results[0]["dpo"][RESUMED], results[0]["resumed"]
    assert again["summary"]["resumed_from"].endswith("step-2")
    timing = ("tokens_per_s", "elapsed")
    strip = [{k: v for k, v in line.items() if k not in timing} for line in first["lines"]]
    assert [{k: v for k, v in line.items() if k not in timing} for line in again["lines"]] == strip
    assert again["summary"]["last_loss"] == first["summary"]["last_loss"]
    assert again["summary"]["eval"][-1] == first["summary"]["eval"][-1]


def test_dpo_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path):
    """The FSDP LoRA DPO run's sharded step-2 checkpoint, resumed by one process: steps 3 and 4 and
    the final evaluation as the 2-process run logged them (summation order aside)."""
    import shutil

    import minift
    out, results = runs
    _, method, _ = DPO_CASES[RESUMED]
    run_dir = tmp_path / "one"
    shutil.copytree(out / f"dpo-{RESUMED}-w{WORLD}", run_dir)
    config = dpo_config(out, RESUMED, 1, output_dir=str(run_dir), resume_from=str(run_dir / "step-2"))
    summary = minift.train(make_model(method), pairs(10), config, eval_data=pairs(7, seed=1))
    two = results[0]["dpo"][RESUMED]
    assert summary["resumed_from"].endswith("step-2") and summary["world_size"] == 1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [line["step"] for line in two["lines"]] == [1, 2, 3, 4]
    for got, want in zip(lines[2:], two["lines"][2:]):
        for key in ("loss", "grad_norm", "chosen_logp", "rejected_logp", "reward_margin"):
            assert close(key, got[key], want[key]), (key, got, want)
    assert close("eval_loss", summary["eval"][-1]["eval_loss"], two["summary"]["eval"][-1]["eval_loss"])


def test_precomputed_reference_scored_by_both_ranks(runs, single):
    out, _ = runs
    name = "fsdp-full-pre"
    two = load_file(dpo_config(out, name, WORLD).output_dir + "/reference_logps.safetensors")
    one = load_file(dpo_config(single[0], name, 1).output_dir + "/reference_logps.safetensors")
    assert two["logps"].shape == (10, 2) and (two["logps"] < 0).all()  # every pair scored
    torch.testing.assert_close(two["logps"], one["logps"], rtol=1e-6, atol=0)
    assert torch.equal(two["sha256"], one["sha256"])
    assert (out / f"dpo-{name}-w{WORLD}" / "eval_reference_logps.safetensors").is_file()


def test_frozen_reference_copy_is_sharded(runs):
    _, results = runs
    for r in results:
        ref = r["reference"]
        assert ref["kind"] == "ModelReference" and ref["placed"] and ref["separate"]
        assert ref["dtensor"] and ref["trainable"] == 0
        assert ref["local"] * WORLD == ref["full"]  # each rank holds its half (tiny's dims divide by 2)


# ---- GRPO -------------------------------------------------------------------------------------
GRPO_EXACT = ("step", "completions", "tokens", "trained_tokens", "lr")
GRPO_CLOSE = ("loss", "grad_norm", "reward_mean", "reward_std", "kl", "clip_fraction", "completion_length")
GRPO_EVAL = ("eval_loss", "eval_reward", "eval_completion_length")
GRPO_SUMMARY = ("first_loss", "last_loss", "tokens", "trained_tokens", "eval")
DIVIDED = [name for name in GRPO_CASES if name != "ddp-uneven"]


@pytest.fixture(scope="module")
def grpo_single(tmp_path_factory):
    """The GRPO runs on one process, no process group."""
    out = tmp_path_factory.mktemp("grpo-one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, {name: run_grpo(out, name, 1, 0) for name in GRPO_CASES}
    finally:
        torch.set_num_threads(threads)


def grpo_close(got, want):
    # the step-1 loss is a sum of advantages that cancel (about 1e-8): an absolute floor
    return got == pytest.approx(want, rel=LOSS_RTOL, abs=1e-7)


def grpo_weights(out, name, world, tag=""):
    return load_file(grpo_config(out, name, world).output_dir + tag + ".safetensors")


@pytest.mark.parametrize("name", DIVIDED)
def test_grpo_two_processes_match_one(runs, grpo_single, name):
    """Whole micro-batches per rank: the rollouts of one process, so every metric, the evaluation
    and the final weights are the 1-process run's (summation order aside)."""
    out, results = runs
    two, one = results[0]["grpo"][name], grpo_single[1][name]
    parallel, _, fields = GRPO_CASES[name]
    assert [line["step"] for line in two["lines"]] == list(range(1, fields["max_steps"] + 1))
    assert two["lines"][0]["kl"] == 0.0 and two["lines"][-1]["kl"] > 0  # it trained away from the reference
    for got, want in zip(two["lines"], one["lines"], strict=True):
        assert {k: got[k] for k in GRPO_EXACT} == {k: want[k] for k in GRPO_EXACT}
        for key in GRPO_CLOSE:
            assert grpo_close(got[key], want[key]), (got["step"], key, got[key], want[key])
    s2, s1 = two["summary"], one["summary"]
    assert (s2["world_size"], s2["parallel"]) == (WORLD, parallel or "fsdp")  # None: FSDP by default
    for got, want in zip(s2["eval"], s1["eval"], strict=True):  # sharded: a blank batch on rank 1
        assert got["step"] == want["step"]
        for key in GRPO_EVAL:
            assert grpo_close(got[key], want[key]), (key, got, want)
    w2, w1 = grpo_weights(out, name, WORLD), grpo_weights(grpo_single[0], name, 1)
    assert w2.keys() == w1.keys() and len(w1) > 0
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=LOSS_RTOL, atol=1e-6)


@pytest.mark.parametrize("name", list(GRPO_CASES))
def test_grpo_ranks_run_in_step_and_agree(runs, grpo_single, name):
    """Both ranks ran the same forwards (FSDP's gathers need it; rows end at different tokens, so
    decoding ran on for the other rank's rows at least once) and returned the same global numbers."""
    _, results = runs
    r0, r1 = (r["grpo"][name] for r in results)
    assert r0["forwards"] == r1["forwards"] < grpo_single[1][name]["forwards"]  # each rank: its share
    assert r0["waited"] + r1["waited"] > 0
    assert {k: r0["summary"][k] for k in GRPO_SUMMARY} == {k: r1["summary"][k] for k in GRPO_SUMMARY}


def test_grpo_prompts_that_do_not_divide(runs, grpo_single):
    """7 prompts in micro-batches of 3 on 2 ranks: each micro-batch's prompts are dealt out (2 + 1,
    then 1 + a blank batch), sampled with the ranks' own seeds: every completion counted once, the
    rollouts another sample than one process's."""
    _, results = runs
    two, one = results[0]["grpo"]["ddp-uneven"], grpo_single[1]["ddp-uneven"]
    assert [line["completions"] for line in two["lines"]] == [line["completions"] for line in one["lines"]] \
        == [12, 12, 4]
    assert [line["tokens"] for line in two["lines"]] == [line["tokens"] for line in one["lines"]]
    assert two["lines"] != one["lines"]
    # half the vocabulary ends a completion: some end before grpo_max_new_tokens (6), so the end
    # token is counted and what follows it is not; the target-token reward tells completions apart
    assert min(line["completion_length"] for line in two["lines"]) < 6
    assert any(line["reward_std"] > 0 for line in two["lines"])
    for line in two["lines"]:
        assert line["trained_tokens"] == pytest.approx(line["completion_length"] * line["completions"])
    assert two["summary"]["trained_tokens"] == sum(line["trained_tokens"] for line in two["lines"])


def test_grpo_resume_on_two_processes_is_exact(runs):
    out, results = runs
    first, again = results[0]["grpo"][GRPO_RESUMED], results[0]["grpo_resumed"]
    assert again["summary"]["resumed_from"].endswith("step-2")
    timing = ("tokens_per_s", "elapsed")
    assert [{k: v for k, v in line.items() if k not in timing} for line in again["lines"]] == \
        [{k: v for k, v in line.items() if k not in timing} for line in first["lines"]]
    assert again["summary"]["eval"][-1] == first["summary"]["eval"][-1]
    straight = grpo_weights(out, GRPO_RESUMED, WORLD)
    resumed = grpo_weights(out, GRPO_RESUMED, WORLD, "-resumed")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], v) for k, v in straight.items())


# ---- one-process pieces: no process group needed -------------------------------------------
def test_shard_batches_pads_with_blank_batches():
    batches = pair_batches(pairs(7), 3, pad_id=0, shuffle=False)  # 3 + 3 + 1 pairs
    parts = [mdist.shard_batches(batches, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    blank = parts[1][1]
    assert blank["pair_index"].tolist() == [-1] and (blank["labels"] == -100).all()
    assert blank["input_ids"].shape[0] == 2  # one pair: its chosen and rejected rows
    assert mdist.shard_batches(batches, 0, 1) is batches
    assert mdist.shard_batches([], 1, 2) == []


def test_shard_checks_its_fields():
    assert repr(mdist.Shard(1, 2, "cpu")) == "Shard(rank=1, world=2, device=cpu)"
    with pytest.raises(ValueError, match=r"Shard.rank must be in \[0, 2\) for world=2, got 2"):
        mdist.Shard(2, 2, "cpu")
    with pytest.raises(ValueError, match="Shard.world must be >= 1, got 0"):
        mdist.Shard(0, 0, "cpu")
    with pytest.raises(TypeError, match="Shard.rank must be an int, got str '0'"):
        mdist.Shard("0", 2, "cpu")


@pytest.mark.parametrize("sizes,world", [([3], 2), ([1], 2), ([3, 2, 1], 2), ([2, 2], 2), ([2, 3], 3)])
def test_shard_group_splits_pair_batches_by_pairs(sizes, world):
    data = pairs(sum(sizes))
    group, start = [], 0
    for n in sizes:
        group.append(collate_pairs(data[start:start + n], pad_id=0, indices=range(start, start + n)))
        start += n
    parts = [mdist.shard_group(group, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # the same number of forwards on every rank
    seen = []
    for part in parts:
        for batch in part:
            b = batch["pair_index"].shape[0]
            assert batch["input_ids"].shape[0] == 2 * b
            for j, index in enumerate(batch["pair_index"].tolist()):
                if index < 0:
                    assert (batch["labels"][[j, j + b]] == -100).all()
                    continue
                seen.append(index)
                length = len(data[index]["chosen_ids"])  # row j is the pair's chosen reply, j + b its rejected one
                assert batch["input_ids"][j, :length].tolist() == data[index]["chosen_ids"]
                length = len(data[index]["rejected_ids"])
                assert batch["input_ids"][j + b, :length].tolist() == data[index]["rejected_ids"]
    assert sorted(seen) == list(range(len(data)))
    assert sum(trained_tokens(b) for p in parts for b in p) == sum(trained_tokens(b) for b in group)


def _trained_policy():
    model = make_model("lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_blank_pairs_add_nothing(loss_type):
    """A batch with a blank pair gives the loss, gradients and metrics of the batch without it."""
    data = pairs(3)
    batch = collate_pairs(data, pad_id=0)
    padded = collate_pairs(data + data[:1], pad_id=0)
    padded["labels"][[3, 7]] = -100
    padded["pair_index"][3] = -1
    results = []
    for b in (batch, padded):
        model = _trained_policy()
        objective = DPOObjective(AdapterReference(model), beta=0.5, loss_type=loss_type, sft_weight=0.5)
        loss, scored, extra = objective.step(model, [b], "cpu", shard=mdist.Shard(0, 1, "cpu"))
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((float(loss), scored, {k: float(v) for k, v in extra.items()}, grads))
    (l1, s1, e1, g1), (l2, s2, e2, g2) = results
    assert math.isfinite(l2) and l2 == pytest.approx(l1, rel=1e-6)
    assert s1 == s2 and e2["pairs"] == 3
    assert e2 == pytest.approx(e1, rel=1e-6, abs=1e-9)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_sharded_step_on_one_process_is_the_plain_step():
    """DPOObjective.step with a 1-process Shard (the torchrun code path) equals the plain step."""
    group = pair_batches(pairs(6), 3, pad_id=0, shuffle=False)
    results = []
    for shard in (None, mdist.Shard(0, 1, "cpu")):
        model = _trained_policy()
        objective = DPOObjective(AdapterReference(model), beta=0.5)
        loss, scored, extra = objective.step(model, group, "cpu", shard=shard)
        extra = {k: float(v) for k, v in extra.items()}  # the means are tensors until the loop reads them
        results.append((float(loss), scored, extra, [p.grad for p in model.parameters() if p.requires_grad]))
    (l1, s1, e1, g1), (l2, s2, e2, g2) = results
    assert (l1, s1, e1) == (l2, s2, e2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_precompute_shares_the_batches_and_skips_blank_pairs():
    """Each rank's part of a sharded precompute, computed here one rank after the other (without a
    process group Shard.sum adds nothing): the parts cover every pair once, and rank 1's blank
    pair (pair_index -1) overwrites nothing."""
    data = pairs(5)  # batches of 2: 2 + 2 + 1 pairs; rank 0 takes batches 0 and 2, rank 1 batch 1 and a blank
    model = _trained_policy()
    want = torch.tensor([p["ref_logps"] for p in precompute_reference(AdapterReference(model), copy.deepcopy(data),
                                                                      batch_size=2)])
    parts = [torch.tensor([p["ref_logps"] for p in precompute_reference(
        AdapterReference(model), copy.deepcopy(data), batch_size=2, shard=mdist.Shard(r, 2, "cpu"))])
        for r in range(2)]
    assert (want < 0).all()
    scored = [set(torch.nonzero(part[:, 0]).flatten().tolist()) for part in parts]
    assert scored[0].isdisjoint(scored[1]) and scored[0] | scored[1] == set(range(5))
    assert 4 not in scored[1]  # the blank's index -1 would have written the last pair
    assert torch.equal(parts[0] + parts[1], want)
