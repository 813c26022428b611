"""Training runs that SIGKILL themselves at a named moment of a checkpoint save, for
tests/test_faults.py. Run as a script, on one process or under torchrun:

    python tests/fault_child.py BASE NAME[:kill=MOMENT@FOLDER][:ranks=1][:resume=R] ...

Each run trains `config(BASE/NAME, world)` (LoRA on the tiny Llama of tests/dist_cases.py, a
checkpoint every step, FSDP under torchrun), one after the other in the same process, so that
one launch can run a reference and then be killed (the imports are most of a launch's time on
a small CPU). A run with a kill ends its process, so it comes last. The kill comes from inside
the process, at an exact point of the save, instead of from a timer (which hits another point on
every machine and load):

    writing@.tmp-step-3   while that folder is filled: one process, after model.safetensors and
                          half of optimizer.safetensors; torchrun, before this rank's DCP shard
    sealed@.tmp-step-3    torchrun: after this rank's DCP shard, before rank 0's manifest
    renamed@.old-step-3   between the two renames of a re-save of step 3
    pruning@.del-step-1   halfway through deleting a pruned checkpoint (its manifest and
                          model.safetensors gone, the rest still there)

Only the ranks in ``ranks=`` (default: every rank) kill themselves; the others go on until the
collective that waits for a dead rank fails or torchrun ends them. Nothing of this is in the
library: the hooks replace module attributes in this process only.
"""
import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_cases, run as a script

import torch  # noqa: E402
from dist_cases import examples, make_model  # noqa: E402

import minift  # noqa: E402
from minift.checkpoints import steps as ckpt  # noqa: E402
from minift.distributed import checkpoint as dckpt  # noqa: E402
from minift.training.config import TrainConfig  # noqa: E402

MAX_STEPS = 5


def config(out, world: int, resume=None) -> TrainConfig:
    return TrainConfig(method="lora", micro_batch_size=2, grad_accum=2, max_steps=MAX_STEPS,
                       learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", bf16=False,
                       seed=0, progress=False, device="cpu", output_dir=str(out), save_interval=1,
                       keep_last=1, resume_from=resume, parallel="fsdp" if world > 1 else None)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str, folder: str, world: int) -> None:
    """Replace the function at `moment` with one that does its part of the work, then dies."""
    if moment == "writing" and world == 1:
        real_save = ckpt.save_file

        def save_file(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            filename = Path(filename)
            if filename.parent.name == folder and filename.name == "optimizer.safetensors":
                os.truncate(filename, filename.stat().st_size // 2)
                die()

        ckpt.save_file = save_file
    elif moment in ("writing", "sealed"):
        real_sharded = dckpt.save_sharded

        def save_sharded(path, *args, **kwargs):
            if Path(path).name == folder and moment == "writing":
                die()
            done = real_sharded(path, *args, **kwargs)
            if Path(path).name == folder:
                die()
            return done

        dckpt.save_sharded = save_sharded
    elif moment == "renamed":
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            if Path(dst).name == folder:
                die()

        os.rename = rename
    elif moment == "pruning":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name == folder:
                for name in (ckpt.MANIFEST, "model.safetensors"):
                    (Path(path) / name).unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"fault_child.py: unknown moment {moment!r}")


def parse_run(text: str) -> dict:
    """'one:kill=sealed@.tmp-step-3:ranks=0,1:resume=latest' -> its fields."""
    name, *options = text.split(":")
    run = {"name": name, "kill": None, "ranks": None, "resume": None}
    for option in options:
        key, value = option.split("=", 1)
        run[key] = value
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("runs", nargs="+", type=parse_run)  # positional: torchrun takes --run for its own
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for run in args.runs:
        ranks = None if run["ranks"] is None else {int(r) for r in run["ranks"].split(",")}
        if run["kill"] and (ranks is None or rank in ranks):
            arm(*run["kill"].split("@", 1), world)
        resume = run["resume"]
        if resume and resume != "latest":
            resume = str(Path(args.base) / resume)
        minift.train(make_model("lora"), examples(), config(Path(args.base) / run["name"], world, resume))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
