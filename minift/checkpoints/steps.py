"""Training checkpoints: atomic on disk, resumable bit for bit, pickle-free.

A checkpoint is a directory ``<output_dir>/step-N`` holding

    model.safetensors       adapter tensors (lora/qlora) or the whole state dict (full)
    optimizer.safetensors   every tensor of ``optimizer.state_dict()["state"]``
    optimizer.json          the rest of the optimizer state (scalars, param_groups)
    rng.safetensors         torch CPU (and CUDA) generator states
    trainer_state.json      step, data position, counters, config, model and base fingerprints,
                            python/numpy RNG
    manifest.json           file names, byte sizes and CRC-32 checksums, and the run's id;
                            written last, it marks the checkpoint complete

It is first written into ``<output_dir>/.tmp-step-N``, every file is fsync'ed, and only then the
directory is renamed to ``step-N``. A crash mid-save leaves a ``.tmp-`` directory (never read;
the next save or run keeps it as ``step-N`` if it is sealed and intact, else deletes it).
Pruning renames ``step-N`` to ``.del-step-N`` before deleting it, so a crash mid-prune never
leaves a half-deleted ``step-N``; a ``step-N`` without a manifest is therefore none of minift's,
and is moved aside rather than deleted. Resuming verifies every checksum: a corrupt file (same
size, other bytes) is found before a single weight is loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minift.checkpoints.fingerprint import (  # noqa: F401
    BASE_RTOL,
    _base_difference,
    base_fingerprint,
    check_compatible,
    data_fingerprint,
    model_fingerprint,
)
from minift.checkpoints.state import _join_optimizer_state, _split_optimizer_state, rng_state, set_rng_state  # noqa: F401
from minift.files import fsync_path, is_disk_full, read_json, reporting_write_errors, write_json
from minift.lora.layer import lora_state_dict

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-step-(\d+)$")  # an interrupted save, re-save or prune
_CRC_CHUNK = 1 << 22  # bytes read at a time for the checksum: bounded memory for any file size
_verified: dict = {}  # checkpoint path -> (file stats) that last passed `verify`


# ---- what goes into a checkpoint ---------------------------------------------------------
def _model_tensors(model: torch.nn.Module, method: str) -> tuple[dict, dict]:
    """Tensors to save, plus aliases (name -> saved name) for tensors shared with another name."""
    if method in ("lora", "qlora"):
        state = lora_state_dict(model)
    else:
        state = model.state_dict()
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        # Tied weights (lm_head / embed_tokens) share storage; safetensors refuses duplicates.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def check_model_tensors(model, tensors: dict, path) -> None:
    """Raise naming the first tensor of a checkpoint that does not fit ``model`` (shape, name) and
    the trainable parameters it lacks; load_state_dict would list them in a traceback."""
    path, own = Path(path), model.state_dict()  # a sharded model's entries have global shapes
    for name, t in tensors.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(f"{path / 'model.safetensors'}: tensor {name!r} has shape "
                             f"{list(t.shape)}, the model's has {list(own[name].shape)}")
    unexpected = [n for n in tensors if n not in own]
    if unexpected:
        raise ValueError(f"{path}: checkpoint has tensors the model lacks: {', '.join(unexpected[:5])}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    absent = [n for n in trainable if n not in tensors]
    if absent:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters: {', '.join(absent[:5])}")


# ---- atomic writing ----------------------------------------------------------------------
def file_crc32(path) -> int:
    """CRC-32 of a file's bytes, read in 4 MiB chunks (measured cost: docs/training.md)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a crash mid-delete leaves a ``.del-`` directory, never a step-N with
    some of its files gone."""
    doomed = path.parent / f".del-{path.name}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def set_aside(path, prefix: str) -> Path:
    """Rename the folder `path` to ``<prefix>-<name>`` beside it, or ``<prefix>-<name>-2``, -3,
    ... when that is taken (the same step can be set aside twice: a run that diverges at step N,
    is resumed, and diverges there again); returns the new path. No such name is ever read as a
    checkpoint."""
    target = aside_name(path, prefix)
    os.rename(path, target)
    return target


def aside_name(path, prefix: str) -> Path:
    """Where `set_aside` would move `path`: the first free ``<prefix>-<name>[-n]`` beside it."""
    path = Path(path)
    base = f"{prefix}-{path.name}"
    target, n = path.parent / base, 1
    while target.exists():
        n += 1
        target = path.parent / f"{base}-{n}"
    return target


def clean_incomplete(output_dir) -> list[str]:
    """Tidy up after interrupted saves and prunes; returns the directories removed.

    Each step's copies (``.tmp-step-N`` being written or sealed, ``step-N``, ``.old-step-N``
    swapped out by a re-save) are settled by `_settle`: the newest that passes `verify` becomes
    ``step-N``, the others go. ``.del-step-N`` (a prune cut short) is deleted. A ``step-N``
    without a manifest is never a save's or a prune's remnant (a save names a folder step-N only
    once its manifest is written; a prune renames it to .del- first), so it is not deleted but
    warned about and moved aside to ``unrecognized-step-N``.
    """
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    copies: dict = {}  # step -> {"tmp" | "old": path}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        leftover = _LEFTOVER.match(entry.name)
        if leftover and leftover.group(1) == "del":
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
        elif leftover:
            copies.setdefault(int(leftover.group(2)), {})[leftover.group(1)] = entry
        elif _STEP_DIR.match(entry.name) and not (entry / MANIFEST).exists():
            aside = set_aside(entry, "unrecognized")
            warnings.warn(f"{entry} has no {MANIFEST}, so minift did not leave it (a save names a "
                          f"folder step-N only after writing its manifest, a prune renames it "
                          f".del-step-N before deleting); moved aside to {aside.name}, not "
                          f"deleted and not read as a checkpoint", stacklevel=2)
    for step, found in sorted(copies.items()):
        removed += _settle(root / f"step-{step}", found)
    return removed


def _settle(final: Path, found: dict) -> list[str]:
    """Keep one copy of a step whose save or re-save was cut short; returns those removed.

    The copies, newest first: ``.tmp-step-N`` (sealed or not), ``step-N``, ``.old-step-N``.
    The newest that passes `verify` (every checksum: a size check cannot tell a corrupt copy
    from a good one) is kept as ``step-N``; when none passes, ``step-N`` stays if it exists,
    else the newest complete one is named ``step-N`` (resuming then reports what is wrong
    with it rather than finding nothing). Only sealed copies are verified.
    """
    copies = [found.get("tmp"), final if (final / MANIFEST).exists() else None, found.get("old")]
    copies = [c for c in copies if c is not None]
    keep = next((c for c in copies if verify(c) is None), None)
    if keep is None:
        keep = final if final in copies else next((c for c in copies if is_complete(c)), None)
    removed = []
    for copy in copies:
        if copy == keep:
            continue
        if copy == final:
            _remove_checkpoint(final)  # via .del-step-N: never a half-deleted step-N
        else:
            shutil.rmtree(copy, ignore_errors=True)
        removed.append(str(copy))
    if keep is not None and keep != final:
        os.rename(keep, final)
        if str(keep) in _verified:  # the same files (inodes, sizes, times): checked already
            _verified[str(final)] = _verified.pop(str(keep))
        fsync_path(final.parent)
    return removed


def first_non_finite(tensors: dict) -> Optional[str]:
    """The name of the first floating tensor holding NaN or Inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _contents(tmp: Path, step: int, model, optimizer, method, rng, trainer_state) -> tuple[dict, dict, dict]:
    """What a 1-process checkpoint holds: ({file: (tensors, metadata)} of its safetensors files,
    optimizer.json, trainer_state.json)."""
    model_tensors, aliases = _model_tensors(model, method)
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    # A checkpoint is the state to go back to; NaN or Inf in it is never one (resuming it fails
    # the same way), and it must not push an older, finite checkpoint out of keep_last.
    for kind, tensors in (("model", model_tensors), ("optimizer", opt_tensors)):
        bad = first_non_finite(tensors)
        if bad is not None:
            newest = latest_checkpoint(tmp.parent)
            raise FloatingPointError(
                f"not saving step {step}: {kind} tensor {bad!r} holds NaN or Inf; the newest "
                f"finite checkpoint is {newest or 'none (no checkpoint was written)'}")
    rng_tensors, rng_meta = rng if rng is not None else rng_state()
    files = {"model.safetensors": (model_tensors, {"aliases": json.dumps(aliases)}),
             "optimizer.safetensors": (opt_tensors, None), "rng.safetensors": (rng_tensors, None)}
    state = dict(trainer_state, step=step, method=method, rng=rng_meta,
                 fingerprint=model_fingerprint(model), format_version=FORMAT_VERSION)
    return files, opt_meta, state


def _size_of(files: dict, *documents: dict) -> int:
    """Bytes a checkpoint takes, near enough to say how much space a failed save needed: its
    tensors and JSON documents (the safetensors headers and the manifest add a few KB)."""
    tensors = sum(t.nbytes for group, _ in files.values() for t in group.values())
    return tensors + sum(len(json.dumps(d)) for d in documents)


def _write_files(tmp: Path, step: int, files: dict, opt_meta: dict, state: dict) -> dict:
    """Every file of the checkpoint but the manifest; returns the manifest."""
    tmp.mkdir()
    for name, (tensors, metadata) in files.items():
        save_file(tensors, tmp / name, metadata=metadata)
    write_json(tmp / "optimizer.json", opt_meta, indent=None, atomic=False)
    return _seal(tmp, step, state)


def _seal(tmp: Path, step: int, state: dict) -> dict:
    """Write trainer_state.json into the filled ``tmp``, fsync every file; return the manifest
    (each file's size and CRC-32, the run it belongs to)."""
    write_json(tmp / "trainer_state.json", state, indent=None, atomic=False)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        fsync_path(tmp / name)
    return {"step": step, "run_id": state.get("run_id"),
            "files": {n: (tmp / n).stat().st_size for n in files},
            "crc32": {n: file_crc32(tmp / n) for n in files}}


def _install(root: Path, tmp: Path, step: int, keep_last: Optional[int], run_id) -> str:
    """Rename the sealed ``tmp`` (manifest written) to ``step-<step>`` and prune this run."""
    final = root / f"step-{step}"
    if final.exists():  # saving the same step again (e.g. after a resume): swap, then drop the old
        old = root / f".old-step-{step}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    if keep_last:
        prune(root, keep_last, step, run_id)
    return str(final)


def finish_checkpoint(root: Path, tmp: Path, step: int, state: dict, keep_last: Optional[int]) -> str:
    """Seal a ``tmp`` directory whose other files are written (the distributed checkpoints of
    `minift.distributed.run`), write its manifest last, install it as ``step-<step>`` and prune."""
    with saving(Path(root), tmp, step, None):
        write_json(tmp / MANIFEST, _seal(tmp, step, state), indent=None, atomic=False)
        fsync_path(tmp)
    return _install(Path(root), tmp, step, keep_last, state.get("run_id"))


def save_checkpoint(output_dir, step: int, *, model, optimizer, method: str, trainer_state: dict,
                    keep_last: Optional[int] = None, rng: Optional[tuple] = None) -> str:
    """Write ``<output_dir>/step-<step>`` atomically and prune this run's older checkpoints.

    Args:
        output_dir: run directory.
        step: optimizer steps completed.
        model: the model being trained.
        optimizer: its optimizer.
        method: "full" (whole state dict) or "lora"/"qlora" (adapter tensors only).
        trainer_state: JSON-able loop state (data position, counters, config, ...); its
            "run_id" marks the checkpoints this run may prune.
        keep_last: keep only this many newest checkpoints of this run (None keeps all); the
            newest one before this step is kept as well (see `prune`).
        rng: (tensors, meta) from `rng_state()` taken earlier; default: the RNG states now.

    Returns:
        The checkpoint directory.

    Raises:
        FloatingPointError: a model or optimizer tensor holds NaN/Inf (nothing is written).
        OSError: the disk is full or not writable (`minift.files.WriteError`); one line naming
            the folder, the bytes needed and free, and the newest intact checkpoint (the
            partial one is removed).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_incomplete(root)
    tmp = root / f".tmp-step-{step}"
    files, opt_meta, state = _contents(tmp, step, model, optimizer, method, rng, trainer_state)
    with saving(root, tmp, step, _size_of(files, opt_meta, state)):
        manifest = _write_files(tmp, step, files, opt_meta, state)
        write_json(tmp / MANIFEST, manifest, indent=None, atomic=False)
        fsync_path(tmp)
    return _install(root, tmp, step, keep_last, trainer_state.get("run_id"))


def resume_hint(root, err: Optional[BaseException] = None) -> str:
    """What is intact after a write in `root` failed with `err`, and how to go on."""
    newest = latest_checkpoint(root)
    if newest is None:
        return "no checkpoint was written yet"
    fix = "free space, then run" if err is None or is_disk_full(err) else "fix the cause, then run"
    return (f"the newest intact checkpoint is {newest}; {fix} again with resume_from='latest' "
            f"(--resume)")


def saving(root: Path, tmp: Path, step: int, needed: Optional[int] = None):
    """A write error while filling `tmp` (a full disk: an OSError, or safetensors' own
    SafetensorError) removes the partial checkpoint to give its space back and becomes one line
    naming the folder, the bytes needed and free, and the newest intact checkpoint."""
    return reporting_write_errors(f"cannot save the checkpoint of step {step} in {root}", root,
                                  needed, then=lambda err: resume_hint(root, err),
                                  undo=lambda: shutil.rmtree(tmp, ignore_errors=True))


def prune(output_dir, keep_last: int, step: int, run_id: Optional[str]) -> list[str]:
    """Delete this run's checkpoints but the newest `keep_last`; returns those deleted.

    Checkpoints of another run (another ``run_id`` in their manifest) are never touched. The
    newest checkpoint before `step` is kept too: step `step` computed a finite loss from its
    weights, while the weights just saved have not been through a forward yet, so with
    keep_last=1 a divergence at the next step would otherwise leave no usable checkpoint.
    """
    mine = [(s, p) for s, p in list_checkpoints(output_dir) if _run_of(p) == run_id]
    keep = {p for _, p in mine[-keep_last:]}
    keep.update(p for _, p in [c for c in mine if c[0] < step][-1:])
    doomed = [p for _, p in mine if p not in keep]
    for path in doomed:
        _remove_checkpoint(Path(path))
    return doomed


def _run_of(path) -> Optional[str]:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


# ---- finding and reading -----------------------------------------------------------------
def is_complete(path) -> bool:
    """True when `path` has a manifest and every file it lists, at the listed size (a cheap
    test: `verify` reads the files and checks their checksums)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / n).is_file() and (path / n).stat().st_size == size
                   for n, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify(path) -> Optional[str]:
    """None when every file of the checkpoint is there with its size and CRC-32; otherwise what
    is wrong, in a few words naming the file. A checkpoint that passed once is not read again
    while its files keep their sizes and modification times."""
    path = Path(path)
    try:
        manifest = read_json(path / MANIFEST, expect=dict)
        files, sums = dict(manifest["files"]), dict(manifest.get("crc32", {}))
    except (ValueError, KeyError, TypeError):
        return f"no valid {MANIFEST}"
    stats = []
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        st = file.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, {size} when it was saved"
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    if _verified.get(str(path)) == stats:
        return None
    for name in files:
        if name in sums and file_crc32(path / name) != sums[name]:
            return f"{name} is corrupt (its CRC-32 differs from the one saved in {MANIFEST})"
    _verified[str(path)] = stats
    return None


def list_checkpoints(output_dir) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), str(entry)))
    return sorted(found)


def latest_checkpoint(output_dir) -> Optional[str]:
    """The newest complete checkpoint under `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def newest_intact(output_dir) -> tuple[Optional[str], list[str]]:
    """(the newest checkpoint that passes `verify`, descriptions of the newer ones that fail)."""
    root = Path(output_dir)
    steps = sorted((int(m.group(1)), e) for e in (root.iterdir() if root.is_dir() else ())
                   if (m := _STEP_DIR.match(e.name)) and (e / MANIFEST).is_file())
    failed = []
    for _, path in reversed(steps):
        problem = verify(path)
        if problem is None:
            return str(path), failed
        failed.append(f"{path}: {problem}")
    return None, failed


def resolve_checkpoint(spec: str, output_dir) -> str:
    """Turn ``resume_from`` ("latest" or a path) into a verified checkpoint directory.

    "latest" (or a run directory) takes the newest checkpoint whose files pass their checksums;
    when newer ones fail, one warning names them and the checkpoint taken instead. A path to a
    checkpoint that fails is an error naming the file and the newest intact checkpoint.
    """
    where = Path(output_dir) if spec == "latest" else Path(spec)
    if spec != "latest" and not where.is_dir():
        raise FileNotFoundError(f"resume_from: checkpoint directory {spec} does not exist")
    if spec == "latest" or not (where / MANIFEST).exists() and not _STEP_DIR.match(where.name):
        path, failed = newest_intact(where)
        if path is None:
            detail = f" ({'; '.join(failed)})" if failed else ""
            raise FileNotFoundError(f"resume_from={spec!r}: no complete checkpoint in {where}{detail}")
        if failed:
            warnings.warn(f"skipping {'; '.join(failed)}; resuming from {path}, the newest intact "
                          f"checkpoint", stacklevel=2)
        return path
    problem = verify(where)
    if problem is not None:
        newest, _ = newest_intact(where.parent)
        other = f"; the newest intact checkpoint is {newest}" if newest else ""
        raise ValueError(f"resume_from: {where}: {problem}{other}")
    return str(where)


def read_trainer_state(path) -> dict:
    return read_json(Path(path) / "trainer_state.json", expect=dict)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(trainer state, model tensors on CPU with tied names filled in, optimizer state dict) of a
    verified 1-process checkpoint; ValueError naming the file at fault."""
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"{path}: not a complete checkpoint: {problem}")
    state = read_trainer_state(path)
    if not isinstance(state.get("rng"), dict):
        raise ValueError(f"{path / 'trainer_state.json'}: no 'rng' entry")
    tensors = load_file(path / "model.safetensors", device="cpu")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    opt_meta = read_json(path / "optimizer.json", expect=dict)
    try:
        opt_state = _join_optimizer_state(load_file(path / "optimizer.safetensors", device="cpu"), opt_meta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path / 'optimizer.json'}: cannot read the optimizer state "
                         f"({type(e).__name__}: {e})") from e
    return state, tensors, opt_state


def load_optimizer_state(optimizer, opt_state: dict, path) -> None:
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: optimizer state does not fit this optimizer "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e


def load_checkpoint(path, *, model, optimizer) -> dict:
    """Restore model tensors, optimizer state and RNG states; return the trainer state dict.

    Raises:
        ValueError: one line naming the checkpoint and the file (or tensor) at fault: a missing
            or corrupt file, a tensor of another shape than the model's, unreadable JSON.
    """
    state, tensors, opt_state = read_checkpoint(path)
    check_model_tensors(model, tensors, path)
    model.load_state_dict(tensors, strict=False)
    load_optimizer_state(optimizer, opt_state, path)
    set_rng_state(load_file(Path(path) / "rng.safetensors", device="cpu"), state["rng"])
    return state
