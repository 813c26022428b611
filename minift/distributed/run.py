"""What the training loop does differently under torchrun, in one object the loop consults.

``DistRun(config)`` joins the process group when the job was launched by torchrun with more
than one process (or with ``parallel`` set on one); otherwise ``active`` is False and every
method is the 1-process behaviour, so the loop calls them unconditionally.

Checkpoints of a distributed run are ``<output_dir>/step-N`` directories like the 1-process ones
(trainer_state.json, rng.safetensors, manifest.json written last), with the model and optimizer
in torch.distributed.checkpoint files instead of safetensors. Either kind can be resumed by a run
of any world size: a directory with DCP's ``.metadata`` is read with DCP (``load_sharded``
re-slices the shards), a 1-process checkpoint by ``minift.checkpoints.steps`` on one process and by
``load_full_checkpoint`` (each rank cuts its rows of the full tensors) under torchrun.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from minift.checkpoints import steps as ckpt
from minift.distributed import checkpoint as dckpt
from minift.distributed import parallel as mdist
from minift.optim.sharded import local

_DCP_MARKER = ".metadata"


def is_sharded_checkpoint(path) -> bool:
    """True for a checkpoint written by a distributed run (model and optimizer in DCP files)."""
    return (Path(path) / _DCP_MARKER).is_file()


class DistRun:
    """The distributed side of one ``train`` call."""

    def __init__(self, config):
        world = mdist.env_world_size()
        self.parallel = mdist.resolve_parallel(config.parallel, world)
        self.config = config
        self.active = self.parallel is not None
        if self.active and getattr(config, "optimizer_in_backward", False):
            # its per-parameter hooks would step on a gradient before DDP all-reduces it, and FSDP2
            # assigns the reduced shards without running accumulate-grad hooks
            raise ValueError(f"TrainConfig.optimizer_in_backward=True with parallel={self.parallel!r} is not "
                             "supported: its hooks would step on gradients before they are reduced across ranks")
        if self.active and world == 1 and not mdist.launched():
            raise ValueError(f"TrainConfig.parallel={config.parallel!r} needs a torchrun launch "
                             "(torchrun --nproc_per_node N ...); on one process leave it None")
        if getattr(config, "fsdp_cpu_offload", False) and self.parallel != "fsdp":
            # apply_parallel reads it only when it shards: on one process it would do nothing
            raise ValueError("TrainConfig.fsdp_cpu_offload=True moves FSDP's shards to host memory, "
                             "and this run is not sharded: it needs a torchrun launch "
                             "(torchrun --nproc_per_node N ...) with parallel='fsdp'")
        self.device = (mdist.init_from_env(config.device, single=True, timeout_s=config.dist_timeout)
                       if self.active else None)
        self.fingerprint: Optional[dict] = None
        # a stopped or stuck rank leaves the others waiting in a collective, silently until the
        # process group's timeout; a stalled step is said after a minute
        self.stalls = StallWatch(config.dist_timeout) if self.active else None

    def begin_step(self, step: int) -> None:
        if self.stalls:
            self.stalls.begin(step)

    def end_step(self) -> None:
        if self.stalls:
            self.stalls.end()

    def close(self) -> None:
        if self.stalls:
            self.stalls.close()

    @property
    def world_size(self) -> int:
        return mdist.world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return mdist.is_main() if self.active else True

    def prepare(self, model, device: torch.device):
        """The model to train: sharded / replicated when active, else moved to ``device``."""
        if not self.active:
            return model.to(device)
        self.fingerprint = ckpt.model_fingerprint(model)  # names and shapes before sharding
        return mdist.apply_parallel(model, self.config, device=device)

    def place_frozen(self, model):
        """A frozen model (a DPO reference copy) laid out like the policy: FSDP-sharded (one unit
        per decoder layer and the root; it has no optimizer), or whole on this rank's device
        under DDP (no wrapper: nothing of it is trained)."""
        if self.parallel == "fsdp":
            return mdist.apply_parallel(model, self.config, device=self.device, frozen=True)
        return model.to(self.device)

    # ---- one step --------------------------------------------------------------------------
    @property
    def shard(self) -> Optional[mdist.Shard]:
        """What the objective's step and evaluation are told: this rank's place, None on one process."""
        return mdist.Shard(mdist.rank(), self.world_size, self.device) if self.active else None

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        """The global gradient norm, clipped to ``max_norm``, as a 0-d device tensor (not read)."""
        return mdist.clip_grad_norm_on_device(params, max_norm)

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, output_dir, step: int, *, model, optimizer, method: str, trainer_state: dict,
             keep_last: Optional[int], rng=None) -> str:
        """Write ``step-<step>`` with DCP shards from every rank; rank 0 adds the rest and the manifest."""
        root = Path(output_dir)
        tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
        self._refuse_non_finite(root, step, model, optimizer)
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            ckpt.clean_incomplete(root)
            tmp.mkdir()
        mdist.barrier()
        dckpt.save_sharded(tmp, model, optimizer, trainable_only=method != "full")
        if self.is_main:
            rng_tensors, rng_meta = rng if rng is not None else ckpt.rng_state()
            with ckpt.saving(root, tmp, step, None):  # a full disk: one line, the space given back
                save_file(rng_tensors, tmp / "rng.safetensors")
            state = dict(trainer_state, step=step, method=method, rng=rng_meta, fingerprint=self.fingerprint,
                         format_version=ckpt.FORMAT_VERSION, world_size=self.world_size, parallel=self.parallel)
            ckpt.finish_checkpoint(root, tmp, step, state, keep_last)
        mdist.barrier()
        return str(final)

    def _refuse_non_finite(self, root: Path, step: int, model, optimizer) -> None:
        """Every rank checks its own shards, and every rank refuses when any holds NaN or Inf,
        before anything is written: a checkpoint is the state to go back to, and resume would
        otherwise take this one (its CRCs are fine). The same one line on every rank."""
        mine = ckpt.first_non_finite({**_local(model.state_dict(), "model"),
                                      **_local(optimizer.state_dict()["state"], "optimizer")})
        found = [None] * self.world_size
        dist.all_gather_object(found, mine)
        bad = [(r, name) for r, name in enumerate(found) if name is not None]
        if bad:
            rank, name = bad[0]
            newest = ckpt.latest_checkpoint(root)
            raise FloatingPointError(
                f"not saving step {step}: tensor {name!r} holds NaN or Inf (rank {rank}'s shard"
                f"{f', and {len(bad) - 1} other rank(s)' if len(bad) > 1 else ''}); the newest "
                f"finite checkpoint is {newest or 'none (no checkpoint was written)'}")

    def load(self, path, *, model, optimizer, method: str) -> dict:
        """Restore a checkpoint of either kind; returns its trainer state."""
        if not is_sharded_checkpoint(path):  # written by a 1-process run
            if self.active:
                return dckpt.load_full_checkpoint(path, model, optimizer)
            return ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
        if not ckpt.is_complete(path):
            raise ValueError(f"{path}: not a complete checkpoint (missing or invalid {ckpt.MANIFEST})")
        dckpt.load_sharded(path, model, optimizer, trainable_only=method != "full")
        state = ckpt.read_trainer_state(path)
        ckpt.set_rng_state(load_file(Path(path) / "rng.safetensors", device="cpu"), state["rng"])
        return state


def _local(tree, prefix: str) -> dict:
    """{dotted name: this rank's tensor} of a (nested) state dict; a DTensor gives its shard."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_local(value, f"{prefix}.{key}"))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = local(tree)
    return out


class StallWatch:
    """Says, once per step, when a step has run far longer than the steps before it.

    Under torchrun every step meets the other ranks in collectives (FSDP's gathers, the loss's
    all-reduce); when one rank is stopped (SIGSTOP, a swap storm, a hung device) the others wait
    there without a word until the process group's timeout (TrainConfig.dist_timeout, 1800 s by
    default). A thread checks the running step: past `after_s` seconds and `factor` times the
    median finished step, one line on stderr names the rank, the step and the timeout.
    """

    def __init__(self, timeout_s: float, after_s: float = 60.0, factor: float = 10.0,
                 poll_s: float = 1.0, out=None):
        self.timeout_s, self.after_s, self.factor, self.poll_s = timeout_s, after_s, factor, poll_s
        self.out = out
        self.times: list[float] = []
        self._step, self._since, self._warned = None, 0.0, False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="minift-stall-watch", daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        with self._lock:
            self._step, self._since, self._warned = step, time.monotonic(), False

    def end(self) -> None:
        with self._lock:
            if self._step is not None:
                self.times.append(time.monotonic() - self._since)
            self._step = None

    def close(self) -> None:
        self._stop.set()

    def limit(self) -> float:
        """Seconds a step may run before it is said to stall."""
        usual = sorted(self.times)[len(self.times) // 2] if self.times else 0.0
        return max(self.after_s, self.factor * usual)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                if self._step is None or self._warned:
                    continue
                waited = time.monotonic() - self._since
                if waited <= self.limit():
                    continue
                self._warned = True
                step = self._step
            usual = f"; finished steps took {sorted(self.times)[len(self.times) // 2]:.1f} s" \
                if self.times else ""
            print(f"minift: rank {mdist.rank()}: step {step} has run {waited:.0f} s{usual}; another "
                  f"rank may be stopped or stuck, and this one waits for it in a collective; the "
                  f"job fails after {self.timeout_s:.0f} s of waiting (TrainConfig.dist_timeout)",
                  file=self.out or sys.stderr, flush=True)
