"""Length-grouped batching (TrainConfig.group_by_length): "bucket" micro-batches of similar
lengths against random ones, deterministic from the seed, and exact resume of either order."""
import random

import pytest
import torch
from test_checkpoint import _crash_then_resume, losses
from test_checkpoint import cfg as ckpt_cfg
from test_trainer import TinyLM, make_examples

import minift.checkpoints.steps as ckpt
from minift.data.preference import pair_batches
from minift.data.sft import batch_examples
from minift.training.config import TrainConfig
from minift.training.loop import train
from minift.training.schedule import epoch_batches, step_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixed(n=800, seed=0):
    """Rows of mixed lengths: mostly short, a long tail (8..64 tokens and 200..500 tokens)."""
    rng = random.Random(seed)
    lengths = [rng.randint(200, 500) if rng.random() < 0.1 else rng.randint(8, 64) for _ in range(n)]
    return [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]


def _padding(batches) -> int:
    return sum(b["attention_mask"].numel() - int(b["attention_mask"].sum()) for b in batches)


def test_grouping_by_length_cuts_the_padding_of_an_epoch():
    rows = _mixed()
    grouped = batch_examples(rows, 8, pad_id=0, seed=0)
    scattered = batch_examples(rows, 8, pad_id=0, seed=0, by_length=False)
    real = sum(len(r["input_ids"]) for r in rows)
    for batches in (grouped, scattered):  # every row once, whatever the order
        assert sum(int(b["attention_mask"].sum()) for b in batches) == real
    # random batches of 8 catch a long row in more than half of them and pad the rest up to it
    assert _padding(scattered) > 2 * real
    assert _padding(grouped) < 0.05 * _padding(scattered)


def test_the_order_is_fixed_by_the_seed_and_both_orders_differ():
    rows = _mixed(200)
    for by_length in (True, False):
        a = batch_examples(rows, 4, pad_id=0, seed=3, by_length=by_length, indices=True)
        assert a == batch_examples(rows, 4, pad_id=0, seed=3, by_length=by_length, indices=True)
        assert a != batch_examples(rows, 4, pad_id=0, seed=4, by_length=by_length, indices=True)
        assert sorted(i for g in a for i in g) == list(range(200))
    # grouped batches hold rows of similar length; random ones do not
    lengths = [len(r["input_ids"]) for r in rows]

    def spread(by_length):
        groups = batch_examples(rows, 4, pad_id=0, seed=3, by_length=by_length, indices=True)
        return sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups)

    assert spread(True) < 0.2 * spread(False)


def test_dpo_pairs_follow_the_same_switch():
    pairs = [{"chosen_ids": [1] * n, "chosen_labels": [1] * n, "rejected_ids": [2] * (n + 1),
              "rejected_labels": [2] * (n + 1)} for n in (len(r["input_ids"]) for r in _mixed(120))]

    def padding(by_length):
        return _padding(pair_batches(pairs, 4, pad_id=0, seed=0, by_length=by_length))

    assert padding(True) < 0.1 * padding(False)


def test_the_loop_reports_less_padding_with_grouping(tmp_path):
    data = make_examples(64, seed=5) + [{"input_ids": [3] * 40, "labels": [3] * 40}] * 8
    efficiency = {}
    for by_length in (True, False):
        summary = train(TinyLM(), data, ckpt_cfg(tmp_path / str(by_length), max_steps=18,
                                                 group_by_length=by_length))
        efficiency[by_length] = summary["padding_efficiency"]
    assert efficiency[False] < 0.8 * efficiency[True]


@pytest.mark.parametrize("by_length", [True, False])
def test_a_step_group_resumed_mid_epoch_holds_the_same_batches(by_length):
    data = make_examples(40, seed=7)
    config = TrainConfig(micro_batch_size=3, grad_accum=2, group_by_length=by_length, seed=11)
    fresh = step_groups(data, config)
    steps = [next(fresh) for _ in range(12)]  # 14 micro-batches an epoch: 7 steps, into epoch 1
    for k in (3, 7, 9):  # mid-epoch 0, an epoch boundary, mid-epoch 1
        epoch, index = steps[k - 1][0]  # where the data continues after step k
        resumed = step_groups(data, config, epoch, index)
        for want in steps[k:]:
            got = next(resumed)
            assert got[0] == want[0] and got[1] == want[1]
            for a, b in zip(got[2], want[2]):
                assert all(torch.equal(a[key], b[key]) for key in a)
    # each epoch has its own order (seed + epoch)
    assert _rows(data, config, 0) != _rows(data, config, 1)


def _rows(data, config, epoch):
    return [tuple(b["input_ids"][:, 0].tolist()) for b in epoch_batches(data, config, epoch)]


def test_a_run_resumed_with_random_batches_gives_identical_losses(tmp_path):
    whole, resumed, summary = _crash_then_resume(tmp_path, "adamw", group_by_length=False)
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert summary["resumed_from"].endswith("step-3")


def test_resume_refuses_another_grouping_and_reads_older_checkpoints_as_grouped(tmp_path,
                                                                                monkeypatch):
    data = make_examples(16)
    train(TinyLM(), data, ckpt_cfg(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"resuming needs the same data order; changed: "
                                         r"group_by_length \(True -> False\)"):
        train(TinyLM(), data, ckpt_cfg(tmp_path, max_steps=2, group_by_length=False,
                                       resume_from="latest"))
    # a checkpoint written before the field existed had grouped batches: it resumes as such
    read = ckpt.read_trainer_state

    def older(path):
        state = read(path)
        del state["config"]["group_by_length"]
        return state

    monkeypatch.setattr(ckpt, "read_trainer_state", older)
    with pytest.raises(ValueError, match=r"group_by_length \(True -> False\)"):
        train(TinyLM(), data, ckpt_cfg(tmp_path, max_steps=2, group_by_length=False,
                                       resume_from="latest"))
    summary = train(TinyLM(), data, ckpt_cfg(tmp_path, max_steps=2, resume_from="latest"))
    assert summary["steps"] == 2 and summary["resumed_from"].endswith("step-1")


def test_the_field_is_checked():
    with pytest.raises(TypeError, match="TrainConfig.group_by_length must be True or False, got str"):
        TrainConfig(group_by_length="no")
    with pytest.raises(ValueError, match=r"group_by_length=False \(random micro-batches\) applies to "
                                         r"batching='bucket'"):
        TrainConfig(group_by_length=False, batching="pack", max_length=64)
    assert TrainConfig().group_by_length is True
