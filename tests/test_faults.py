"""SIGKILLs at the moments a checkpoint save is most fragile, then a resume, against a run that
was never interrupted: on one process bit for bit; under torchrun (2 gloo processes on the CPU)
bit for bit on 2 processes, and on 1 and 3 within LOSS_RTOL (another world size sums in
another order).

The runs are tests/fault_child.py (the tiny Llama, LoRA, a checkpoint every step, keep_last=1),
which kills itself at an exact point of the save; see its docstring for the moments.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_cases import LOSS_RTOL, examples, free_port, make_model
from fault_child import MAX_STEPS, config

import minift
from minift.checkpoints import steps as ckpt
from minift.distributed import checkpoint as dckpt
from minift.training.setup import make_optimizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              # DCP reading a torchrun checkpoint on this one process says so, as intended
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

CHILD = Path(__file__).resolve().parent / "fault_child.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def child(base, *runs):
    """fault_child.py on one process; its return code (-9: killed as planned)."""
    done = subprocess.run([sys.executable, str(CHILD), str(base), *runs], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def launch(nproc, base, *runs):
    """fault_child.py under torchrun with `nproc` gloo processes; (return code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "--monitor-interval", "0.1", str(CHILD), str(base),
           *runs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    return done.returncode, done.stdout + done.stderr


def here(out, resume=None):
    """The run on this process (no launch to pay for)."""
    return minift.train(make_model("lora"), examples(), config(out, 1, resume))


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def folders(out):
    return sorted(p.name for p in Path(out).iterdir() if p.is_dir())


def assert_identical(want, got):
    """Every step's loss and gradient norm, and the last checkpoint's tensors, bit for bit."""
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in records(got)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in records(want)]
    last = f"step-{MAX_STEPS}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = ckpt.load_file(Path(want) / last / name), ckpt.load_file(Path(got) / last / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_one_process_killed_at_each_save_moment_resumes_bit_identical(tmp_path):
    whole = tmp_path / "whole"
    here(whole)
    # killed while .tmp-step-3 is filled: half an optimizer file, no manifest
    run = tmp_path / "writing"
    assert child(tmp_path, "writing:kill=writing@.tmp-step-3") == -signal.SIGKILL
    assert folders(run) == [".tmp-step-3", "step-1", "step-2"]
    assert here(run, "latest")["resumed_from"] == str(run / "step-2")
    assert_identical(whole, run)

    # killed halfway through deleting step-1, the prune after step 3's save
    run = tmp_path / "pruning"
    assert child(tmp_path, "pruning:kill=pruning@.del-step-1") == -signal.SIGKILL
    assert folders(run) == [".del-step-1", "step-2", "step-3"]
    # resumed from step-2, the run saves step 3 again: killed between the two renames, when
    # neither copy is named step-3
    assert child(tmp_path, "pruning:kill=renamed@.old-step-3:resume=pruning/step-2") == -signal.SIGKILL
    assert folders(run) == [".old-step-3", ".tmp-step-3", "step-2"]
    assert here(run, "latest")["resumed_from"] == str(run / "step-3")
    assert_identical(whole, run)
    assert folders(run) == [f"step-{MAX_STEPS - 1}", f"step-{MAX_STEPS}"]


def sharded_weights(path):
    """The trainable tensors of a torchrun checkpoint, read on this one process."""
    model = make_model("lora")
    dckpt.load_sharded(path, model, make_optimizer(model, config(path, 1)), trainable_only=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(out):
    return [r["loss"] for r in records(out)]


def test_torchrun_killed_resumes_on_one_two_and_three_processes(tmp_path):
    """Three launches (a launch's imports cost more than its training here): the reference run
    on 2 processes, then a run whose rank 1 dies before writing its shard of step 3 (rank 0,
    left waiting in the save, is ended by torchrun); that run resumed on 2 processes, then a run
    killed whole (every rank after writing its shard of step 3, before rank 0's manifest); that
    last run resumed on 3 processes, and on 1 here."""
    ref, one, group = tmp_path / "ref", tmp_path / "one", tmp_path / "group"
    code, log = launch(2, tmp_path, "ref", "one:kill=writing@.tmp-step-3:ranks=1")
    assert code != 0 and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(one)] == [1, 2] and ".tmp-step-3" in folders(one)
    code, log = launch(2, tmp_path, "one:resume=latest", "group:kill=sealed@.tmp-step-3")
    assert code != 0 and log.count("Signal 9 (SIGKILL)") == 2, log[-3000:]
    want = losses(ref)
    assert len(want) == MAX_STEPS
    # resumed on 2: bit for bit
    assert [(r["loss"], r["grad_norm"]) for r in records(one)] == \
        [(r["loss"], r["grad_norm"]) for r in records(ref)]
    a, b = sharded_weights(ref / f"step-{MAX_STEPS}"), sharded_weights(one / f"step-{MAX_STEPS}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert ".tmp-step-3" in folders(group) and [s for s, _ in ckpt.list_checkpoints(group)] == [1, 2]
    shutil.copytree(group, tmp_path / "group-3")
    code, log = launch(3, tmp_path, "group-3:resume=latest")
    assert code == 0, log[-3000:]
    assert json.loads((tmp_path / "group-3" / "summary.json").read_text())["world_size"] == 3
    summary = here(group, "latest")
    assert summary["resumed_from"] == str(group / "step-2") and summary["world_size"] == 1
    for run in (group, tmp_path / "group-3"):
        got = losses(run)
        assert got[:2] == want[:2]  # written before the kill
        assert got[2:] == pytest.approx(want[2:], rel=LOSS_RTOL)
