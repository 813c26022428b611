"""Rules of a run and its output folder, checked by the training loop before and while it runs.

- A fresh run never writes into a folder that holds another run's checkpoints (it would prune or
  resume them); it says to resume or to pick a new folder.
- The method must match what is trainable: "lora" on a model without adapters would fine-tune
  every weight and label the run "lora".
- Every token id must index the embedding (an index error deep in the forward names nothing).
- metrics.jsonl is trimmed to the resumed step atomically; a torn last line is dropped, and the
  temporary file of a trim cut short by a kill is removed at the next run's start.
- A divergence names the newest checkpoint whose weights a finite step has used.
- A model that stopped learning (gradient norm exactly 0, loss pinned at ln(vocab)) is reported.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from minift.checkpoints import steps as ckpt
from minift.data.preference import PAIR_KEYS
from minift.distributed import parallel as mdist
from minift.files import atomic_write, reporting_write_errors, stale_temp_files
from minift.lora.layer import LoRALinear, adapter_predicate
from minift.names import IGNORE_INDEX
from minift.nf4.linear import NF4Linear


def new_run_id() -> str:
    """An id written into every checkpoint of a run, so pruning touches only its own."""
    return uuid.uuid4().hex


# ---- before the run ----------------------------------------------------------------------
def check_run(model, train_data, eval_data, config) -> None:
    """Every rule a run is checked against before its first step (see the module docstring)."""
    check_output_dir(config.output_dir, config.resume_from)
    check_method(model, config.method)
    vocab = vocab_size_of(model)
    check_token_ids(train_data, vocab, "train_data")
    if eval_data is not None:
        check_token_ids(eval_data, vocab, "eval_data")


def peak_label(device) -> str:
    """What the step lines' peak figure measures: the process's peak resident memory on CPU
    (Python, libraries and all), CUDA's allocated high-water mark on GPU."""
    return "peak alloc" if device.type == "cuda" else "peak RSS"


def check_output_dir(output_dir, resume_from) -> None:
    """Refuse a fresh run into a folder that already holds checkpoints."""
    if resume_from:
        return
    found = ckpt.list_checkpoints(output_dir)
    if found:
        names = ", ".join(Path(p).name for _, p in found[-3:])
        raise ValueError(f"output_dir {output_dir} holds the checkpoints of an earlier run ({names}); "
                         f"continue it with resume_from='latest' (--resume), or train into a new "
                         f"output_dir (--output)")


def check_method(model, method: str) -> None:
    """The method names what is trained: adapters only (lora, qlora) or the weights (full)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = any(isinstance(m, LoRALinear) for m in model.modules())
    quantized = any(isinstance(m, NF4Linear) for m in model.modules())
    if method in ("lora", "qlora"):
        mine = adapter_predicate(model)  # lora_ tensors and modules_to_save
        others = [n for n in trainable if not mine(n)]
        if not adapters:
            raise ValueError(f"TrainConfig.method={method!r}, but the model has no LoRA adapters; "
                             f"wrap it with minift.lora_wrap first, or use method='full'")
        if others:
            raise ValueError(f"TrainConfig.method={method!r} trains only adapters, but "
                             f"{len(others)} other parameter(s) require grad (first: {others[0]!r}); "
                             f"freeze them or use method='full'")
        if method == "lora" and quantized:
            raise ValueError("TrainConfig.method='lora', but the base is NF4-quantized; "
                             "use method='qlora'")
        if method == "qlora" and not quantized:
            raise ValueError("TrainConfig.method='qlora', but the base is not NF4-quantized "
                             "(minift.quantize_model or load_model(..., quantize='nf4')); "
                             "use method='lora'")
    elif adapters:
        raise ValueError("TrainConfig.method='full', but the model has LoRA adapters; use "
                         "method='lora' (or 'qlora'), or minift.merge_lora the model first")


def vocab_size_of(model) -> Optional[int]:
    """Rows of the token embedding (model.embed_tokens), or None when there is none."""
    try:
        return int(model.get_submodule("model.embed_tokens").num_embeddings)
    except (AttributeError, TypeError):
        return None


def check_token_ids(examples, vocab_size: Optional[int], name: str) -> None:
    """Every input id in [0, vocab_size); labels are ids or -100."""
    if vocab_size is None:
        return
    for i, ex in enumerate(examples):
        for key in [k for k in ("input_ids", "labels") + PAIR_KEYS if k in ex]:  # SFT or DPO
            ids = np.asarray(ex[key], dtype=np.int64)  # one vectorised pass per list
            wrong = (ids >= vocab_size) | ((ids < 0) & (ids != IGNORE_INDEX if key.endswith("labels") else True))
            if wrong.any():
                j = int(np.flatnonzero(wrong)[0])
                raise ValueError(f"{name}[{i}]: {key}[{j}] is token id {int(ids[j])}, outside the "
                                 f"model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); "
                                 f"was the data tokenized with this model's tokenizer?")


# ---- leftovers of a killed run -------------------------------------------------------------
RUN_FILES = ("metrics.jsonl", "summary.json")  # rewritten atomically through a temporary file


def clean_leftovers(output_dir) -> list[str]:
    """What a killed run left in `output_dir`: interrupted checkpoint saves and prunes
    (`ckpt.clean_incomplete`), and the temporary files of an interrupted rewrite of
    metrics.jsonl (the trim on resume) or summary.json, which nothing else would ever remove.
    Returns what was removed."""
    removed = ckpt.clean_incomplete(output_dir)
    for name in RUN_FILES:
        for leftover in stale_temp_files(output_dir, name):
            leftover.unlink(missing_ok=True)
            removed.append(str(leftover))
    return removed


# ---- metrics.jsonl -----------------------------------------------------------------------
def trim_metrics(path, step: int) -> int:
    """Keep the lines of steps <= `step` (a crashed run may have logged past its checkpoint),
    atomically: a kill mid-rewrite leaves the old file or the new one. A torn last line (the
    kill came mid-write) is dropped with a warning; a bad line elsewhere is an error naming
    file:line. Returns the number of lines kept."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError) as err:
            if lineno == len(lines):
                warnings.warn(f"{path}:{lineno}: dropped a torn last line (the run was stopped "
                              f"while writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}:{lineno}: not a metrics record ({err})") from None
        if record_step <= step:
            kept.append(line)
    text = "".join(k + "\n" for k in kept)
    with reporting_write_errors(f"cannot rewrite {path}", path.parent, len(text.encode()),
                                then=lambda err: ckpt.resume_hint(path.parent, err)):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return len(kept)


def append_metrics(log, line: dict, path) -> None:
    """Append one record to the open metrics file `log` (unbuffered, binary). A failed write (a
    full disk) is cut back off, so the file keeps whole lines, and raises one line naming the
    file, the bytes and the newest intact checkpoint."""
    data = (json.dumps(line) + "\n").encode()
    path = Path(path)
    end = os.fstat(log.fileno()).st_size

    def cut_back():  # truncating needs no space
        with contextlib.suppress(OSError):
            os.ftruncate(log.fileno(), end)

    with reporting_write_errors(f"cannot append step {line['step']} to {path}", path.parent,
                                len(data), then=lambda err: ckpt.resume_hint(path.parent, err),
                                undo=cut_back):
        view = memoryview(data)
        while view:  # a raw file may write part of it
            view = view[log.write(view):]


# ---- when a step fails ---------------------------------------------------------------------
def bad_batch(output_dir, step: int, what: str, value: float, rows: list, epoch: int) -> str:
    """The message of a non-finite step caused by its data: the weights are finite on other data,
    so no checkpoint is set aside; the step's rows are named with the way to pass over them."""
    newest = ckpt.latest_checkpoint(Path(output_dir))
    resume = (f"resume from {newest} with skip_steps=[{step}] (--skip-step {step}) to pass over them"
              if newest else f"start again with skip_steps=[{step}] (--skip-step {step}) to pass over them")
    return (f"training {what} is {value} at step {step}, and the cause is its data: the weights give a "
            f"finite loss on other rows but not on this step's, rows {_shown(rows)} of train_data "
            f"(epoch {epoch}); check or drop those rows, or {resume}")


def _shown(rows: list, limit: int = 16) -> str:
    return ", ".join(map(str, rows[:limit])) + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def divergence(output_dir, step: int, what: str, value: float, rows: Optional[list] = None) -> str:
    """The message of a non-finite loss or gradient norm at `step`, after setting aside the
    checkpoint of step - 1: its weights gave that loss, so resuming it diverges again. It is
    renamed ``diverged-step-N`` (``diverged-step-N-2``, ... when a resumed run diverged at the
    same step before; kept for inspection, never taken by resume_from='latest')."""
    root = Path(output_dir)
    suspect = root / f"step-{step - 1}"
    note, aside = "", None
    # every rank words the message alike before anything moves; under torchrun rank 0 renames
    # and the others wait (two ranks renaming one folder race)
    if suspect.is_dir():
        aside = ckpt.aside_name(suspect, "diverged")
        note = f"; {suspect.name}, whose weights gave it, is renamed {aside.name}"
    newest = next((p for _, p in reversed(ckpt.list_checkpoints(root)) if Path(p) != suspect), None)
    mdist.barrier()
    if aside is not None and mdist.is_main():
        os.rename(suspect, aside)
    mdist.barrier()
    resume = (f"the newest checkpoint with finite weights that a finite step has used is {newest}; "
              f"lower the learning rate and resume from it" if newest else
              "no checkpoint to go back to; lower the learning rate and start again")
    data = f" (the step's rows: {_shown(rows)} of train_data)" if rows else ""
    return f"training {what} is {value} at step {step}{data}{note}; {resume}"


class DeadModelWatch:
    """Warns once when training has stopped doing anything: a gradient norm of exactly 0 (every
    gradient vanished, e.g. after a huge step saturated the activations), or the loss pinned at
    ln(vocab) — uniform predictions — for `patience` steps in a row. A random-init model starts
    near ln(vocab) too, but its loss moves by far more than `tolerance` from step to step.

    ``zero_norm_can_be_fine``: a zero gradient norm is no sign of a dead model (GRPO: a step whose
    groups each scored all their completions the same, with the policy still equal to its
    reference, has no gradient at all), so only the loss is watched."""

    def __init__(self, vocab_size: Optional[int], patience: int = 3, tolerance: float = 1e-4,
                 zero_norm_can_be_fine: bool = False):
        self.uniform = math.log(vocab_size) if vocab_size else None
        self.patience, self.tolerance = patience, tolerance
        self.watch_norm = not zero_norm_can_be_fine
        self.pinned, self.warned = 0, set()

    def update(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """The warning to show after `step` (each kind once); None otherwise."""
        found = []
        if self.watch_norm and grad_norm == 0.0 and "norm" not in self.warned:
            self.warned.add("norm")
            found.append(f"step {step}: gradient norm is exactly 0, so no weight changes any more; "
                         f"the model has likely died (a too-high learning rate saturates it); lower "
                         f"the learning rate and resume from an earlier checkpoint")
        if self.uniform is not None:
            pinned = abs(loss - self.uniform) < self.tolerance * self.uniform
            self.pinned = self.pinned + 1 if pinned else 0
            if self.pinned >= self.patience and "loss" not in self.warned:
                self.warned.add("loss")
                found.append(f"step {step}: the loss has stayed at ln(vocab) = {self.uniform:.4f} "
                             f"for {self.pinned} steps: the model predicts a uniform distribution "
                             f"and has likely died; lower the learning rate")
        return "; ".join(found) or None
