"""A full disk at each moment a run writes: a checkpoint, the third checkpoint (two to keep), a
metrics line, the example's final outputs. Each ends with one line naming the folder or file,
the bytes it needed and what is intact; the older checkpoints stay intact and a resume after
freeing space gives the losses and weights of an uninterrupted run, bit for bit.

The writers are made to fail as a full disk makes them fail: safetensors with its own
SafetensorError (not an OSError), plain files with OSError(ENOSPC) after writing what fitted. A
slow test repeats the checkpoint case on a real, small tmpfs where mounting is permitted."""
import errno
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_trainer import TinyLM, cfg, make_examples

import minift.checkpoints.steps as ckpt
from minift.files import WriteError, write_error
from minift.training import loop
from minift.training.config import TrainConfig
from minift.training.loop import train
from minift.training.setup import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"
SETTINGS = dict(max_steps=5, save_interval=1, keep_last=2)


def full_disk_at(monkeypatch, fragment):
    """safetensors fails as on a full disk for every file whose path holds `fragment`."""
    real = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        if fragment in str(filename):
            raise SafetensorError(NO_SPACE)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def start():
    """The model every run of a test starts from (train seeds after the model is built)."""
    torch.manual_seed(0)
    return TinyLM()


def assert_resumes_exactly(tmp_path, data, from_step):
    whole = start()
    train(whole, data, cfg(tmp_path, output_dir=str(tmp_path / "whole"), **SETTINGS))
    resumed = TinyLM()  # other weights: everything must come from the checkpoint
    summary = train(resumed, data, cfg(tmp_path, resume_from="latest", **SETTINGS))
    assert summary["resumed_from"] == str(tmp_path / "run" / f"step-{from_step}")
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_write_errors_as_one_line(tmp_path):
    full = write_error(SafetensorError(NO_SPACE), "cannot write x", tmp_path, 1234, "then this")
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC
    said = str(full)
    assert said.startswith("[Errno 28] cannot write x: No space left on device (it needs about "
                           "1,234 bytes; ") and said.endswith(f" bytes are free in {tmp_path}); then this")
    free = int(said.split("; ")[1].split(" bytes")[0].replace(",", ""))  # others write to /tmp too
    assert abs(free - shutil.disk_usage(tmp_path).free) < 2**30
    denied = write_error(PermissionError(errno.EACCES, "Permission denied"), "cannot write x",
                         tmp_path, 1234)
    assert str(denied) == "[Errno 13] cannot write x: Permission denied"  # sizes only when full
    # a SafetensorError about the tensors themselves is no I/O error: left as it is
    assert write_error(SafetensorError("invalid dtype"), "cannot write x", tmp_path) is None


def test_a_checkpoint_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    model = TinyLM()
    optimizer = make_optimizer(model, TrainConfig(method="full"))
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    save = dict(model=model, optimizer=optimizer, method="full", trainer_state={"run_id": "a"})
    good = ckpt.save_checkpoint(tmp_path, 1, **save)
    on_disk = sum(p.stat().st_size for p in Path(good).iterdir())
    full_disk_at(monkeypatch, ".tmp-step-2")
    with pytest.raises(WriteError) as caught:
        ckpt.save_checkpoint(tmp_path, 2, **save)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"[Errno 28] cannot save the checkpoint of step 2 in {tmp_path}: "
                               f"No space left on device (it needs about ")
    needed = int(message.split("it needs about ")[1].split(" bytes")[0].replace(",", ""))
    # its tensors and JSON: all of a checkpoint but the safetensors headers and the manifest
    assert 0.9 * on_disk < needed < on_disk
    assert f"bytes are free in {tmp_path}); the newest intact checkpoint is {good}; free space, " \
           f"then run again with resume_from='latest' (--resume)" in message
    assert os.listdir(tmp_path) == ["step-1"] and ckpt.verify(good) is None


def test_the_third_checkpoint_on_a_full_disk_keeps_two_and_resumes_exactly(tmp_path, monkeypatch):
    data = make_examples(24)
    full_disk_at(monkeypatch, ".tmp-step-3")
    with pytest.raises(WriteError, match=r"cannot save the checkpoint of step 3 in .*run: No space "
                                         r"left on device \(it needs about [\d,]+ bytes; [\d,]+ bytes "
                                         r"are free in .*run\); the newest intact checkpoint is "
                                         r".*run/step-2; free space"):
        train(start(), data, cfg(tmp_path, **SETTINGS))
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "step-1", "step-2"]
    assert all(ckpt.verify(run / f"step-{s}") is None for s in (1, 2))  # nothing was pruned
    monkeypatch.undo()  # space freed
    assert_resumes_exactly(tmp_path, data, from_step=2)


class FillingDisk:
    """An unbuffered file on a disk that fills up at the `full_at`-th write: that write stores
    what fits (half of it), then fails with ENOSPC, as the kernel does."""

    def __init__(self, path, full_at):
        self.file, self.writes, self.full_at = open(path, "ab", buffering=0), 0, full_at

    def write(self, data):
        data = data.encode() if isinstance(data, str) else bytes(data)
        self.writes += 1
        if self.writes >= self.full_at:
            self.file.write(data[:len(data) // 2] if self.writes == self.full_at else b"")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_metrics_line_on_a_full_disk_is_cut_back_and_named(tmp_path, monkeypatch):
    data = make_examples(24)
    metrics = tmp_path / "run" / "metrics.jsonl"
    real_open = open

    def open_metrics(path, mode="r", *args, **kwargs):
        if Path(path) == metrics:
            return FillingDisk(path, full_at=4)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(loop, "open", open_metrics, raising=False)
    with pytest.raises(WriteError) as caught:
        train(start(), data, cfg(tmp_path, **SETTINGS))
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # whole lines only
    message = str(caught.value)
    assert message.startswith(f"[Errno 28] cannot append step 4 to {metrics}: No space left on "
                              f"device (it needs about ")
    assert f"the newest intact checkpoint is {tmp_path / 'run' / 'step-3'}; free space" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert_resumes_exactly(tmp_path, data, from_step=3)


def test_the_metrics_trim_and_the_summary_on_a_full_disk_are_named(tmp_path, monkeypatch):
    from minift.training import rundir

    data, run = make_examples(24), tmp_path / "run"
    train(start(), data, cfg(tmp_path, **SETTINGS))
    metrics = run / "metrics.jsonl"
    kept = "".join(line + "\n" for line in metrics.read_text().splitlines()[:2])

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "atomic_write", full)
    with pytest.raises(WriteError, match=rf"^\[Errno 28\] cannot rewrite {metrics}: No space left on "
                                         rf"device \(it needs about {len(kept):,} bytes; [\d,]+ bytes "
                                         rf"are free in {run}\); the newest intact checkpoint is "
                                         rf"{run}/step-5; free space"):
        rundir.trim_metrics(metrics, 2)
    monkeypatch.undo()
    monkeypatch.setattr(loop, "write_json", full)
    with pytest.raises(WriteError, match=rf"^\[Errno 28\] cannot write {run}/summary.json: No space "
                                         rf"left on device \([\d,]+ bytes are free in {run}\); the "
                                         rf"newest intact checkpoint is {run}/step-5; free space"):
        train(start(), data, cfg(tmp_path, resume_from="latest", **SETTINGS))


def _script():
    spec = importlib.util.spec_from_file_location("train_llama", ROOT / "examples" / "train_llama.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("fails", ["adapter", "merged", "summary.json"])
def test_the_final_outputs_on_a_full_disk_name_the_path(tmp_path, monkeypatch, fails):
    script = _script()
    out = tmp_path / "out"
    args = script.parse_args(["--output", str(out), "--merge", "--device", "cpu"])
    args.device_type = "cpu"
    tokenizer, model = script.load_base(args, torch.device("cpu"))
    last = ckpt.save_checkpoint(out, 3, model=model, optimizer=make_optimizer(
        model, TrainConfig(method="lora")), method="lora", trainer_state={})
    import safetensors.torch

    real_save, real_json = safetensors.torch.save_file, script.write_json

    def save_file(tensors, filename, metadata=None):
        if f"/{fails}/" in str(filename):
            raise SafetensorError(NO_SPACE)
        return real_save(tensors, filename, metadata=metadata)

    def write_json(path, obj, **kwargs):
        if Path(path).name == fails:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_json(path, obj, **kwargs)

    for module in ("minift.lora.adapter", "minift.models.loading"):
        monkeypatch.setattr(f"{module}.save_file", save_file)
    monkeypatch.setattr(script, "write_json", write_json)
    with pytest.raises(script.OutputsNotSaved) as caught:
        script.write_outputs(model, tokenizer, args, {}, [torch.tensor([1, 5, 9, 14])])
    message = str(caught.value)
    assert message.startswith(f"[Errno 28] cannot write {out / fails}: No space left on device (")
    sizes = "" if fails == "summary.json" else "it needs about "
    assert f"({sizes}" in message and f"bytes are free in {out}); training finished and its " \
           f"checkpoint {last} is intact; free space, then run the same command with --resume to " \
           f"write the outputs" in message
    if fails == "adapter":  # the adapter's tensors: r=8 adapters of the shipped base in float32
        needed = int(message.split("it needs about ")[1].split(" bytes")[0].replace(",", ""))
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) * 4
        assert needed == lora
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".saving-*"))


def test_main_reports_unsaved_outputs_in_one_line(monkeypatch, capsys):
    script = _script()

    def finished_but_full(args):
        raise script.OutputsNotSaved("[Errno 28] cannot write out/adapter: No space left on device")

    monkeypatch.setattr(script, "run", finished_but_full)
    assert script.main(["--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "train_llama.py: error: [Errno 28] cannot write out/adapter: No space left on device"]


# ---- a real full disk ----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs; skipped where this process may not mount one (not root, no CAP_SYS_ADMIN,
    not Linux)."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=30)


@pytest.mark.slow
def test_the_third_checkpoint_on_a_real_full_disk(tmp_path, small_disk, monkeypatch):
    data = make_examples(24)
    run = small_disk / "run"
    real = ckpt.save_checkpoint

    def fill_before_the_third(output_dir, step, **kwargs):
        if step == 3:  # leave room for a third of a checkpoint: the save runs out midway
            size = sum(p.stat().st_size for p in (run / "step-2").iterdir())
            free = shutil.disk_usage(small_disk).free
            with open(small_disk / "filler", "wb") as f:
                f.write(b"\0" * (free - size // 3))
        return real(output_dir, step, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", fill_before_the_third)
    with pytest.raises(WriteError, match=rf"^\[Errno 28\] cannot save the checkpoint of step 3 in "
                                         rf"{run}: No space left on device \(it needs about [\d,]+ "
                                         rf"bytes; [\d,]+ bytes are free in {run}\); the newest "
                                         rf"intact checkpoint is {run}/step-2; free space"):
        train(start(), data, cfg(tmp_path, output_dir=str(run), **SETTINGS))
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "step-1", "step-2"]
    assert all(ckpt.verify(run / f"step-{s}") is None for s in (1, 2))
    monkeypatch.undo()
    shutil.copytree(run, tmp_path / "run")
    assert_resumes_exactly(tmp_path, data, from_step=2)
