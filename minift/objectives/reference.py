"""Per-row log-probabilities of replies and the references DPO compares the policy with.

``sequence_logps`` / ``model_logps`` sum log p(token) over each row's scored tokens (from full
logits, or a chunk of tokens at a time without them). The references give pi_ref's log-probs of a
pair batch: ``AdapterReference`` (the LoRA policy with its adapters off: no copy),
``ModelReference`` (a frozen copy, optionally NF4), ``SelfReference`` (the model itself, for the
one scoring pass before training) and ``StoredReference`` (log-probs computed once by
``precompute_reference`` and read from the batch).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minift.checkpoints.steps import data_fingerprint
from minift.data.preference import check_pairs, pair_batches
from minift.distributed.parallel import reshard, unwrap
from minift.files import atomic_write
from minift.lora.layer import check_base_kept, disable_adapters, lora_layers
from minift.names import IGNORE_INDEX
from minift.nf4.linear import quantize_model
from minift.objectives.loss import chunked_row_logps, scored_chunks, supports_chunked_loss

REFERENCE_FILE = "reference_logps.safetensors"
MODEL_KEYS = ("input_ids", "attention_mask")


# ---- log-probabilities -------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor):
    """Summed log-probabilities of the labelled tokens of each row, and how many there are.

    Args:
        logits: (N, T, V); logits[:, t] predicts labels[:, t + 1].
        labels: (N, T), -100 where a token is not scored (prompt, padding).

    Returns:
        (logps, counts): float32 (N,) sums of log p(label) and (N,) token counts.
    """
    targets = labels[:, 1:]  # (N, T-1)
    n, t = targets.shape
    # cross_entropy per token = -log p(target); it never materializes a (N, T, V) log-softmax
    # copy beyond the float32 logits, and ignore_index gives 0 on unscored positions
    nll = F.cross_entropy(logits[:, :-1].float().reshape(n * t, -1), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(n, t)
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def model_logps(model, batch: dict, device, bf16: bool = False, chunk: Optional[int] = None):
    """(logps, counts) of every row of a (2B, T) pair batch under `model`.

    With ``chunk`` (and a model that returns hidden states, minift's Llama) the lm_head and the
    log-softmax run ``chunk`` tokens at a time (``minift.objectives.loss.chunked_row_logps``): no (2B, T, V)
    logits, for one more lm_head forward in backward.
    """
    # copied without blocking, before the forward is queued (a blocking copy waits for the
    # device to finish all queued work)
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS}
    labels = batch["labels"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if chunk is not None and supports_chunked_loss(model):
            hidden = model(**inputs, return_hidden=True)  # (2B, T, H)
            # the chunks to run, read from the host labels (no sync)
            return chunked_row_logps(hidden, unwrap(model).lm_head, labels, chunk,
                                     scored_chunks(batch["labels"], chunk))
        logits = model(**inputs)  # (2B, T, V)
    return sequence_logps(logits, labels)


# ---- the reference -----------------------------------------------------------------------
class AdapterReference:
    """The policy with its LoRA adapters switched off: the base it started from, no copy.

    Only valid when the adapters start at zero (a fresh `lora_wrap`), or when the intended
    reference is the base model itself. Dropout is off (eval mode) while it runs.
    """

    kind = "adapters_disabled"
    chunk = None  # tokens per lm_head chunk (DPOObjective sets its loss_chunk_size)

    def __init__(self, model):
        if not lora_layers(model):
            raise ValueError("AdapterReference needs a LoRA-wrapped model; with full fine-tuning "
                             "use ModelReference(frozen copy) or precompute_reference")
        check_base_kept(model, "AdapterReference")  # modules_to_save: adapters off is not the base
        self.model = model

    @torch.no_grad()
    def logps(self, batch, device, bf16=False):
        with eval_mode(self.model), disable_adapters(self.model):
            return model_logps(self.model, batch, device, bf16, self.chunk)[0]


class ModelReference:
    """A separate frozen model (the policy's copy before training, optionally NF4)."""

    kind = "frozen_copy"
    chunk = None

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.placed = False  # True once `place` put it where it runs (then logps moves nothing)

    def place(self, place):
        """Lay the copy out with ``place`` (model -> model): under torchrun, sharded like the
        policy (FSDP) or on the rank's device (DDP)."""
        self.model = place(self.model)
        self.placed = True

    @classmethod
    def copy_of(cls, model, nf4: bool = False):
        """A frozen deep copy of `model`; with nf4=True its linears (lm_head aside) are stored as
        NF4, about 0.52 bytes per weight instead of 2-4."""
        frozen = copy.deepcopy(model)
        ref = cls(quantize_model(frozen) if nf4 else frozen)
        ref.kind = "frozen_copy_nf4" if nf4 else cls.kind
        return ref

    @torch.no_grad()
    def logps(self, batch, device, bf16=False):
        if not self.placed and any(p.device != torch.device(device) for p in self.model.parameters()):
            self.model.to(device)
        out = model_logps(self.model, batch, device, bf16, self.chunk)[0]
        reshard(self.model)  # a sharded copy's root stays gathered after forward for its lm_head
        return out


class SelfReference:
    """The model as it is now, in eval mode and without autograd: the reference of a full
    fine-tune for the one pass of `precompute_reference` before training, without a copy."""

    kind = "self"
    chunk = None

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def logps(self, batch, device, bf16=False):
        with eval_mode(self.model):
            return model_logps(self.model, batch, device, bf16, self.chunk)[0]


class StoredReference:
    """Reference log-probabilities stored with the pairs (see `precompute_reference`)."""

    kind = "precomputed"

    def logps(self, batch, device, bf16=False):
        if "ref_logps" not in batch:
            raise ValueError("StoredReference: the batch has no 'ref_logps'; run "
                             "precompute_reference on the pairs first")
        return batch["ref_logps"].to(device, non_blocking=True)  # a blocking copy waits for the device


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) for the block, then as it was."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _read_stored(path, fingerprint):
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read stored reference log-probs: {err}") from None
    if tensors.get("sha256") is None or bytes(tensors["sha256"].tolist()).hex() != fingerprint["sha256"]:
        return None  # another data set: computed again
    return tensors["logps"]


@torch.no_grad()
def precompute_reference(reference, pairs, path=None, *, batch_size=8, pad_id=0, device="cpu",
                         bf16=False, shard=None):
    """Score every pair once with `reference` and store the result in the pairs (and on disk).

    Args:
        reference: an AdapterReference or ModelReference.
        pairs: tokenized pairs; each gets "ref_logps" = (chosen, rejected).
        path: a safetensors file; when it exists and was written for the same pairs it is read
            instead of running the reference, else it is (re)written.
        shard: under torchrun, this rank's `minift.distributed.parallel.Shard` (every rank calls this):
            the ranks read the file or score the batches together, each its share, and every
            rank ends with all the log-probs; rank 0 alone writes the file.

    Returns:
        The same pairs.
    """
    check_pairs(pairs, "pairs")
    fingerprint = data_fingerprint(pairs)
    stored = _read_stored(path, fingerprint) if path is not None and Path(path).exists() else None
    if shard is not None:  # every rank read the file, or all of them score (FSDP's collectives)
        if int(shard.sum(torch.tensor(float(stored is not None), dtype=torch.float64))) != shard.world:
            stored = None
    if stored is None:
        stored = torch.zeros(len(pairs), 2, dtype=torch.float64)  # (N, [chosen, rejected])
        device = torch.device(device)
        batches = pair_batches(pairs, batch_size, pad_id=pad_id, shuffle=False)
        for batch in batches if shard is None else shard.eval(batches):
            logps = reference.logps(batch, device, bf16).double().cpu()  # (2B,)
            b = len(batch["pair_index"])
            keep = batch["pair_index"] >= 0  # a blank pair (shard padding) is not stored
            stored[batch["pair_index"][keep]] = torch.stack([logps[:b], logps[b:]], dim=1)[keep]
        if shard is not None:  # each pair was scored on one rank, zeros elsewhere: exact sums
            stored = shard.sum(stored)
        if path is not None and (shard is None or shard.rank == 0):
            digest = torch.tensor(list(bytes.fromhex(fingerprint["sha256"])), dtype=torch.uint8)
            atomic_write(path, lambda tmp: save_file({"logps": stored, "sha256": digest}, tmp))
    for pair, (c, r) in zip(pairs, stored.tolist()):
        pair["ref_logps"] = (c, r)
    return pairs
