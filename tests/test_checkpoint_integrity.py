"""Checkpoint integrity: checksums, falling back to the newest intact checkpoint, never saving
NaN/Inf, pruning only this run's checkpoints, and one-line errors for damaged files."""
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from test_trainer import TinyLM

import minift.checkpoints.steps as ckpt
from minift.training.config import TrainConfig
from minift.training.setup import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _opt(model):
    return make_optimizer(model, TrainConfig(method="full", progress=False))


def _save(out, step, model=None, run_id="run-a", keep_last=None):
    model = model or TinyLM()
    optimizer = _opt(model)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    return ckpt.save_checkpoint(out, step, model=model, optimizer=optimizer, method="full",
                                trainer_state={"run_id": run_id}, keep_last=keep_last)


def _flip_byte(path, offset=-5):
    """Same size, other bytes: what a size-only check cannot see."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def test_manifest_holds_a_crc32_of_every_file(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads(open(os.path.join(path, ckpt.MANIFEST)).read())
    assert set(manifest["crc32"]) == set(manifest["files"]) and len(manifest["files"]) == 5
    import zlib
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    assert manifest["crc32"]["model.safetensors"] == zlib.crc32(data)
    assert manifest["run_id"] == "run-a" and ckpt.verify(path) is None


def test_same_size_corruption_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    _flip_byte(os.path.join(bad, "model.safetensors"))
    assert ckpt.is_complete(bad)  # the sizes still match
    assert ckpt.verify(bad) == ("model.safetensors is corrupt (its CRC-32 differs from the one "
                                "saved in manifest.json)")
    with pytest.warns(UserWarning, match=r"step-2: model.safetensors is corrupt.*resuming from "
                                         r".*step-1, the newest intact") as caught:
        assert ckpt.resolve_checkpoint("latest", tmp_path) == good
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    # named explicitly: an error naming the file and the intact checkpoint, not a silent load
    with pytest.raises(ValueError, match=r"step-2: model.safetensors is corrupt.*newest intact "
                                         r"checkpoint is .*step-1"):
        ckpt.resolve_checkpoint(bad, tmp_path)
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        ckpt.load_checkpoint(bad, model=TinyLM(), optimizer=_opt(TinyLM()))


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.json", "optimizer.safetensors"])
def test_corrupt_state_files_are_named(tmp_path, name):
    path = _save(tmp_path, 1)
    _flip_byte(os.path.join(path, name), offset=-2)
    with pytest.raises(ValueError, match=rf"step-1: {name} is corrupt"):
        ckpt.resolve_checkpoint(path, tmp_path)


def test_corrupt_json_of_a_checkpoint_without_checksums_is_one_line(tmp_path):
    path = _save(tmp_path, 1)
    manifest_path = os.path.join(path, ckpt.MANIFEST)
    manifest = json.load(open(manifest_path))
    del manifest["crc32"]  # a checkpoint written before checksums existed
    json.dump(manifest, open(manifest_path, "w"))
    for name in ("trainer_state.json", "optimizer.json"):
        text = open(os.path.join(path, name)).read()
        open(os.path.join(path, name), "w").write("{" + text[1:-1] + "]")  # same size
        model = TinyLM()
        with pytest.raises(ValueError, match=rf"{name}:1: invalid JSON \("):
            ckpt.load_checkpoint(path, model=model, optimizer=_opt(model))
        open(os.path.join(path, name), "w").write(text)


def test_resume_of_a_checkpoint_whose_file_is_gone_names_the_file(tmp_path):
    path = _save(tmp_path, 6)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"step-6: model.safetensors is missing$"):
        ckpt.resolve_checkpoint(path, tmp_path)


def test_wrong_shape_tensors_are_one_line(tmp_path):
    path = _save(tmp_path, 1, model=TinyLM(dim=16))
    model = TinyLM(dim=8)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'lm_head.weight' "
                                         r"has shape \[32, 16\], the model's has \[32, 8\]") as err:
        ckpt.load_checkpoint(path, model=model, optimizer=_opt(model))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_state_is_never_saved(tmp_path, where):
    good = _save(tmp_path, 1)
    model = TinyLM()
    optimizer = _opt(model)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    if where == "model":
        with torch.no_grad():
            model.mix.weight[0, 0] = float("inf")
    else:
        optimizer.state[model.mix.weight]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"not saving step 2: {where} tensor .* NaN or Inf; "
                                                 rf"the newest finite checkpoint is .*step-1"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, method="full",
                             trainer_state={"run_id": "run-a"}, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["step-1"] and ckpt.verify(good) is None


def test_disk_full_is_one_line_naming_the_newest_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError) as err:
        _save(tmp_path, 2)
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    assert "cannot save the checkpoint of step 2" in message and "No space left on device" in message
    assert f"the newest intact checkpoint is {good}" in message and "resume" in message
    assert sorted(os.listdir(tmp_path)) == ["step-1"]  # the partial save gave its space back


def test_pruning_keeps_other_runs_and_the_newest_checkpoint_a_step_has_used(tmp_path):
    _save(tmp_path, 5, run_id="earlier")
    for step in (1, 2, 3):
        _save(tmp_path, step, run_id="now", keep_last=1)
    # step-3's weights have not been through a forward yet: step-2 stays as well
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3, 5]
    assert ckpt.prune(tmp_path, 2, 4, "now") == []


def test_a_prune_cut_short_is_finished(tmp_path):
    good = _save(tmp_path, 3)
    (tmp_path / ".del-step-2").mkdir()  # a prune that stopped after its rename
    (tmp_path / ".del-step-2" / "model.safetensors").write_bytes(b"left over")
    assert ckpt.clean_incomplete(tmp_path) == [str(tmp_path / ".del-step-2")]
    assert sorted(os.listdir(tmp_path)) == ["step-3"] and ckpt.verify(good) is None


def test_a_step_folder_without_manifest_is_moved_aside_not_deleted(tmp_path):
    good = _save(tmp_path, 3)
    weights = os.urandom(980_000)
    for attempt in (1, 2):  # the same name twice: the second gets its own folder
        stray = tmp_path / "step-1"
        stray.mkdir()
        (stray / "model.safetensors").write_bytes(weights)
        with pytest.warns(UserWarning) as caught:
            assert ckpt.clean_incomplete(tmp_path) == []
        aside = "unrecognized-step-1" + ("" if attempt == 1 else "-2")
        assert [str(w.message) for w in caught] == [
            f"{stray} has no manifest.json, so minift did not leave it (a save names a folder "
            f"step-N only after writing its manifest, a prune renames it .del-step-N before "
            f"deleting); moved aside to {aside}, not deleted and not read as a checkpoint"]
        assert (tmp_path / aside / "model.safetensors").read_bytes() == weights
    assert sorted(os.listdir(tmp_path)) == ["step-3", "unrecognized-step-1", "unrecognized-step-1-2"]
    assert ckpt.list_checkpoints(tmp_path) == [(3, good)]  # not counted by a later run
    assert ckpt.resolve_checkpoint("latest", tmp_path) == good
    ckpt.clean_incomplete(tmp_path)  # nothing more to say or move
    assert sorted(os.listdir(tmp_path)) == ["step-3", "unrecognized-step-1", "unrecognized-step-1-2"]


def _copy_of_step_10(where, seed):
    """A complete step-10 checkpoint of a model drawn with `seed`, written under `where`."""
    torch.manual_seed(seed)
    model = TinyLM()
    return Path(_save(where, 10, model=model)), model


@pytest.mark.parametrize("corrupt,winner", [("old", "tmp"), (None, "tmp"), ("tmp", "old")])
def test_a_kill_between_the_renames_of_a_resave_keeps_the_newest_intact_copy(tmp_path, corrupt, winner):
    """_install renames step-10 to .old-step-10, then .tmp-step-10 to step-10; killed between
    the two, both copies are there and neither is step-10. Sizes cannot tell a corrupt copy (same
    size, other bytes) from a good one; checksums can, and the newer copy wins a tie."""
    run = tmp_path / "run"
    run.mkdir()
    old, old_model = _copy_of_step_10(tmp_path / "a", seed=1)
    new, new_model = _copy_of_step_10(tmp_path / "b", seed=2)
    os.rename(old, run / ".old-step-10")
    os.rename(new, run / ".tmp-step-10")
    if corrupt:
        _flip_byte(run / f".{corrupt}-step-10" / "model.safetensors")
    loser = {"tmp": ".old-step-10", "old": ".tmp-step-10"}[winner]
    assert ckpt.clean_incomplete(run) == [str(run / loser)]
    assert sorted(os.listdir(run)) == ["step-10"] and ckpt.verify(run / "step-10") is None
    model = TinyLM()
    ckpt.load_checkpoint(run / "step-10", model=model, optimizer=_opt(model))
    want = new_model if winner == "tmp" else old_model
    for (name, a), b in zip(want.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_kill_after_sealing_a_resave_keeps_the_new_copy(tmp_path):
    """Killed after the new copy's manifest, before the first rename: step-10 and a complete
    .tmp-step-10; the newer one wins. Killed while writing it: step-10 stays."""
    run = tmp_path / "run"
    run.mkdir()
    old, _ = _copy_of_step_10(tmp_path / "a", seed=1)
    new, new_model = _copy_of_step_10(tmp_path / "b", seed=2)
    os.rename(old, run / "step-10")
    os.rename(new, run / ".tmp-step-10")
    assert ckpt.clean_incomplete(run) == [str(run / "step-10")]
    model = TinyLM()
    ckpt.load_checkpoint(run / "step-10", model=model, optimizer=_opt(model))
    assert torch.equal(model.lm_head.weight, new_model.lm_head.weight)
    (run / ".tmp-step-10").mkdir()  # a re-save killed before its manifest
    (run / ".tmp-step-10" / "model.safetensors").write_bytes(b"half")
    assert ckpt.clean_incomplete(run) == [str(run / ".tmp-step-10")]
    assert sorted(os.listdir(run)) == ["step-10"] and ckpt.verify(run / "step-10") is None


def test_train_resumes_from_the_newest_intact_checkpoint(tmp_path):
    from test_trainer import cfg, make_examples

    from minift.training.loop import train

    data = make_examples(24)
    train(TinyLM(), data, cfg(tmp_path, max_steps=3, save_interval=1))
    run = tmp_path / "run"
    _flip_byte(run / "step-3" / "optimizer.safetensors")
    with pytest.warns(UserWarning, match=r"skipping .*step-3: optimizer.safetensors is corrupt"):
        summary = train(TinyLM(), data, cfg(tmp_path, max_steps=4, resume_from="latest"))
    assert summary["resumed_from"] == str(run / "step-2") and summary["steps"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]
