"""Rules of a run's output folder and of what it trains (minift/training/rundir.py)."""
import json
import math
import os

import pytest
import torch
from test_trainer import TinyLM, tiny_llama

import minift.checkpoints.steps as ckpt
from minift.lora.layer import lora_wrap
from minift.nf4.linear import quantize_model
from minift.training import rundir
from minift.training.config import TrainConfig
from minift.training.setup import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _save(out, step, run_id="a"):
    model = TinyLM()
    return ckpt.save_checkpoint(out, step, model=model, optimizer=make_optimizer(
        model, TrainConfig(method="full")), method="full", trainer_state={"run_id": run_id})


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    rundir.check_output_dir(tmp_path / "new", None)  # nothing there: fine
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    with pytest.raises(ValueError, match=r"output_dir .* holds the checkpoints of an earlier run "
                                         r"\(step-3, step-6\); continue it with resume_from='latest' "
                                         r"\(--resume\), or train into a new output_dir \(--output\)"):
        rundir.check_output_dir(tmp_path, None)
    rundir.check_output_dir(tmp_path, "latest")


def test_method_must_match_what_is_trainable():
    torch.manual_seed(0)
    plain = tiny_llama()
    with pytest.raises(ValueError, match="method='lora', but the model has no LoRA adapters"):
        rundir.check_method(plain, "lora")
    rundir.check_method(plain, "full")
    wrapped = lora_wrap(tiny_llama(), r=2)
    rundir.check_method(wrapped, "lora")
    with pytest.raises(ValueError, match="method='full', but the model has LoRA adapters"):
        rundir.check_method(wrapped, "full")
    with pytest.raises(ValueError, match="method='qlora', but the base is not NF4-quantized"):
        rundir.check_method(wrapped, "qlora")
    wrapped.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 other parameter\(s\) require grad \(first: "
                                         r"'lm_head.weight'\)"):
        rundir.check_method(wrapped, "lora")
    quantized = lora_wrap(quantize_model(tiny_llama()), r=2)
    rundir.check_method(quantized, "qlora")
    with pytest.raises(ValueError, match="base is NF4-quantized; use method='qlora'"):
        rundir.check_method(quantized, "lora")


def test_token_ids_outside_the_vocabulary_name_example_and_position():
    good = {"input_ids": [1, 2, 31], "labels": [-100, 2, 31]}
    rundir.check_token_ids([good], 32, "train_data")
    with pytest.raises(ValueError, match=r"train_data\[1\]: input_ids\[2\] is token id 32, outside "
                                         r"the model's vocabulary of 32 \(ids 0..31\)"):
        rundir.check_token_ids([good, {"input_ids": [1, 2, 32], "labels": [-100, 2, 3]}], 32,
                               "train_data")
    with pytest.raises(ValueError, match=r"eval_data\[0\]: labels\[0\] is token id -5"):
        rundir.check_token_ids([{"input_ids": [1, 2], "labels": [-5, 2]}], 32, "eval_data")
    assert rundir.vocab_size_of(TinyLM(vocab=40)) == 40
    assert rundir.vocab_size_of(torch.nn.Linear(2, 2)) is None


def test_trim_metrics_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: dropped a torn last line"):
        assert rundir.trim_metrics(path, 3) == 3
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        rundir.trim_metrics(path, 3)


def test_trim_metrics_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(text)

    def killed(src, dst):
        raise KeyboardInterrupt("killed during the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.trim_metrics(path, 1)
    assert path.read_text() == text and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_divergence_sets_aside_the_checkpoint_that_gave_the_loss(tmp_path):
    first = _save(tmp_path, 2)
    _save(tmp_path, 4)
    message = rundir.divergence(tmp_path, 5, "loss", float("nan"))
    assert message == (f"training loss is nan at step 5; step-4, whose weights gave it, is renamed "
                       f"diverged-step-4; the newest checkpoint with finite weights that a finite "
                       f"step has used is {first}; lower the learning rate and resume from it")
    assert ckpt.resolve_checkpoint("latest", tmp_path) == first
    assert (tmp_path / "diverged-step-4" / ckpt.MANIFEST).exists()


def test_dead_model_watch():
    watch = rundir.DeadModelWatch(vocab_size=32)
    assert watch.update(1, 3.0, 0.5) is None
    assert "gradient norm is exactly 0" in watch.update(2, 3.0, 0.0)
    assert watch.update(3, 3.0, 0.0) is None  # once
    uniform = math.log(32)
    # a random-init model hovers near ln(V), but moves by far more than 1e-4 relative
    assert [watch.update(s, uniform + d, 0.1) for s, d in enumerate((0.01, -0.02, 0.015, 0.01))] \
        == [None] * 4
    assert watch.update(10, uniform, 0.1) is None and watch.update(11, uniform + 1e-6, 0.1) is None
    assert "stayed at ln(vocab) = 3.4657 for 3 steps" in watch.update(12, uniform, 0.1)


def test_dead_model_watch_of_grpo_takes_a_zero_norm():
    """GRPO: groups that each scored their completions alike give no gradient; the loss is no
    cross-entropy (no vocab)."""
    watch = rundir.DeadModelWatch(None, zero_norm_can_be_fine=True)
    assert [watch.update(s, 0.0, 0.0) for s in range(5)] == [None] * 5


def test_a_trim_killed_midway_leaves_no_temporary_file_behind(tmp_path):
    from test_trainer import cfg, make_examples

    from minift.training.loop import train

    run = tmp_path / "run"
    train(TinyLM(), make_examples(16), cfg(tmp_path, max_steps=2))
    # what atomic_write's temporary files look like when SIGKILL came before their rename
    killed = [run / ".metrics.jsonl.k1x9_q2.tmp", run / ".summary.json.p0a7zz3w.tmp"]
    for path in killed:
        path.write_text('{"step": 1}\n')
    kept = [run / ".notes.txt.tmp", run / "metrics.jsonl.tmp"]  # not minift's: left alone
    for path in kept:
        path.write_text("mine")
    assert rundir.clean_leftovers(run) == [str(p) for p in killed]
    for path in killed:
        path.write_text('{"step": 1}\n')
    train(TinyLM(), make_examples(16), cfg(tmp_path, max_steps=3, resume_from="latest"))
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".notes.txt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "step-2", "step-3", "summary.json"])


def test_diverging_twice_at_one_step_sets_aside_both_and_names_the_checkpoint(tmp_path):
    from test_trainer import cfg, make_examples

    from minift.training.loop import train

    data, run = make_examples(40), tmp_path / "run"
    settings = dict(max_steps=6, save_interval=2, grad_accum=1)
    with pytest.raises(FloatingPointError, match=r"renamed diverged-step-4;"):
        train(TinyLM(nan_at_call=5), data, cfg(tmp_path, **settings))  # step 5's forward
    # resumed from step-2, the run saves step-4 again and its step 5 diverges again
    with pytest.raises(FloatingPointError) as caught:
        train(TinyLM(nan_at_call=3), data, cfg(tmp_path, resume_from="latest", **settings))
    assert str(caught.value) == (
        f"training loss is nan at step 5 (the step's rows: 14, 19, 20, 30 of train_data); step-4, "
        f"whose weights gave it, is renamed "
        f"diverged-step-4-2; the newest checkpoint with finite weights that a finite step has "
        f"used is {run / 'step-2'}; lower the learning rate and resume from it")
    assert sorted(p.name for p in run.iterdir() if "step" in p.name) == \
        ["diverged-step-4", "diverged-step-4-2", "step-2"]
    assert ckpt.verify(run / "diverged-step-4-2") is None  # kept whole, for inspection
    assert rundir.divergence(tmp_path / "nothing", 3, "loss", float("inf")).endswith(
        "no checkpoint to go back to; lower the learning rate and start again")


def test_only_rank_0_sets_a_diverged_checkpoint_aside_and_every_rank_says_the_same(tmp_path, monkeypatch):
    # under torchrun every rank handles the divergence; two ranks renaming one folder raced
    from minift.distributed import parallel as mdist
    (tmp_path / "step-2").mkdir()
    monkeypatch.setattr(mdist, "is_main", lambda: False)
    other = rundir.divergence(tmp_path, 3, "loss", float("nan"))
    assert (tmp_path / "step-2").is_dir() and not (tmp_path / "diverged-step-2").exists()
    monkeypatch.setattr(mdist, "is_main", lambda: True)
    main = rundir.divergence(tmp_path, 3, "loss", float("nan"))
    assert main == other and "is renamed diverged-step-2" in main
    assert not (tmp_path / "step-2").exists() and (tmp_path / "diverged-step-2").is_dir()


def test_only_rank_0_tidies_the_run_folder(tmp_path, monkeypatch):
    # every rank called clean_incomplete on one folder under torchrun; they raced on its renames
    from minift.distributed import parallel as mdist
    from minift.training.loop import tidy
    (tmp_path / ".del-step-3").mkdir()  # a prune cut short: clean-up removes it
    monkeypatch.setattr(mdist, "is_main", lambda: False)
    tidy(tmp_path)
    assert (tmp_path / ".del-step-3").is_dir()
    monkeypatch.setattr(mdist, "is_main", lambda: True)
    tidy(tmp_path)
    assert not (tmp_path / ".del-step-3").exists()
