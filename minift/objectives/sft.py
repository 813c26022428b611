"""The default objective, token cross-entropy: the loss of a micro-batch, a step's accumulated
gradients, the evaluation, and ``SFTObjective``, which the training loop drives (DPO's
``minift.objectives.dpo.DPOObjective`` has the same methods).

A step's summed token losses are divided by the trained tokens of the whole step, so the
gradient does not depend on how the step is split into micro-batches (or over ranks under
torchrun, ``minift.distributed.parallel``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from minift.data.sft import batch_examples, check_examples
from minift.data.transfer import to_device
from minift.distributed import parallel as mdist
from minift.names import IGNORE_INDEX
from minift.objectives.loss import model_loss_sum, scored_chunks, supports_chunked_loss, token_loss_sum
from minift.placement import default_device
from minift.tracing import known

__all__ = ["SFTObjective", "accumulate_gradients", "evaluate", "trained_tokens"]


def trained_tokens(batch: dict) -> int:
    """Number of label positions that contribute to the loss (after the shift), counted on the
    host batch: no host-device sync (the step divides by it before its first forward)."""
    labels = batch["labels"]
    # fake labels (a planning trace) have no values: every position counts
    every = labels.shape[0] * (labels.shape[1] - 1)
    return int(known(lambda: (labels[:, 1:] != IGNORE_INDEX).sum(), every))


def _batch_loss_sum(model, batch: dict, device, bf16: bool, chunk=None) -> torch.Tensor:
    inputs = to_device(batch, device)  # labels too, before the forward is queued
    labels = inputs.pop("labels")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if chunk is not None and supports_chunked_loss(model):  # no (B, T, V) logits
            # the chunks to run, read from the host labels (no sync)
            return model_loss_sum(model, inputs, labels, chunk, scored_chunks(batch["labels"], chunk))
        logits = model(**inputs)  # (B, T, V)
    return token_loss_sum(logits, labels)


def accumulate_gradients(model, micro_batches: list, device, bf16: bool = False,
                         loss_chunk_size: Optional[int] = None):
    """Forward/backward over one optimizer step's micro-batches.

    Each micro-batch's summed token loss is divided by the trained tokens of *all* micro-batches,
    so the accumulated gradient equals that of one big batch: 1 x 8 and 8 x 1 agree.
    With ``loss_chunk_size`` (and a model that returns hidden states) the loss is computed a
    chunk of tokens at a time (``minift.objectives.loss``).

    Returns:
        (loss, n_trained): the step's mean token loss as a 0-dim tensor, and its trained tokens.
    """
    n_trained = sum(trained_tokens(b) for b in micro_batches)  # counted before any forward
    device = torch.device(device)
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        loss = _batch_loss_sum(model, batch, device, bf16, loss_chunk_size) / max(n_trained, 1)
        loss.backward()
        total += loss.detach()
    return total, n_trained


@torch.no_grad()
def evaluate(model, examples: list, config, device=None, shard=None) -> dict:
    """Mean token loss (and perplexity) of `examples`, in eval mode, with the training batching.

    With a ``shard`` (a `minift.distributed.parallel.Shard`, under torchrun; every rank calls it) each
    rank runs its share of the batches (``shard.eval``: every rank the same number of forwards)
    and the summed loss and token count are added over ranks in float64, so every rank returns
    the global result.
    """
    device = torch.device(device or default_device(config.device))
    was_training = model.training
    model.eval()
    batches = batch_examples(examples, config.micro_batch_size, pad_id=config.pad_id,
                             mode=config.batching, max_length=config.max_length, shuffle=False)
    mine = batches if shard is None else shard.eval(batches)
    total = sum(float(_batch_loss_sum(model, b, device, config.bf16, config.loss_chunk_size))
                for b in mine)
    count = sum(trained_tokens(b) for b in mine)
    if shard is not None:
        total, count = shard.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        count = int(count)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


class SFTObjective:
    """The default objective, token cross-entropy; DPO's (minift.objectives.dpo.DPOObjective) has the same
    methods, which is all the loop asks of an objective."""

    name = "sft"
    check = staticmethod(check_examples)

    def __init__(self, loss_chunk_size: Optional[int] = None):
        self.loss_chunk_size = loss_chunk_size

    def step(self, model, micro_batches, device, bf16=False, shard=None):
        """(mean loss, trained tokens, extra metrics) of one step, gradients accumulated. With a
        ``shard`` (torchrun): this rank's share of the micro-batches, normalised by all ranks'
        trained tokens (`minift.distributed.parallel.accumulate_over_ranks`), global loss and count."""
        if shard is None:
            return (*accumulate_gradients(model, micro_batches, device, bf16, self.loss_chunk_size), {})

        def loss_sum(model, batch, device):
            return _batch_loss_sum(model, batch, device, bf16, self.loss_chunk_size)
        # every rank has the whole step's host batches: the global count without a collective
        n_total = sum(trained_tokens(b) for b in micro_batches)
        return (*mdist.accumulate_over_ranks(model, shard.step(micro_batches), device, loss_sum,
                                            trained_tokens, n_total), {})

    def evaluate(self, model, examples, config, device, shard=None):
        return evaluate(model, examples, config, device, shard)

    @torch.no_grad()
    def finite_on(self, model, batch, device, config) -> bool:
        """Whether the model's loss on one micro-batch is finite (naming a batch that gave NaN)."""
        return math.isfinite(float(_batch_loss_sum(model, batch, device, config.bf16, self.loss_chunk_size)))

    def frozen_models(self) -> tuple:
        """Modules besides the policy that the step keeps alive (none for the token loss)."""
        return ()

    def distribute(self, shard, place):
        """Nothing to lay out: the token loss needs only the model (DPOObjective's places its
        reference)."""
