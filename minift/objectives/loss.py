"""Next-token cross-entropy without the (B, T, V) logits: lm_head + loss a chunk of tokens at a time.

At vocabulary 128,256 the fp32 logits of one 2 x 2048 batch are 2 * 2048 * 128256 * 4 B = 1.96 GiB,
and their gradient as much again; with chunking only (chunk, V) logits live at once. Each chunk's
gradient is formed in the forward pass (one lm_head matmul forward, one backward, as unchunked),
so the backward pass only scales what was kept by the incoming gradient:

    loss  = sum_c CE(lm_head(h_c).float(), y_c)                 summed over trained tokens
    dL/dh = g * concat_c dCE_c/dh_c      dL/dθ = g * sum_c dCE_c/dθ   (g = incoming 0-d grad)

θ are the lm_head's parameters that require grad (a LoRA head's A/B, a full head's weight, the
embedding when tied). They are inputs of the autograd Function, so autograd sums a tied
embedding's two gradients before its leaf is updated once.

Chunks without a scored token (a prompt or padding only) are skipped. Which ones those are is
read from the labels once, before the forward (``scored_chunks``), from the host copy of the
micro-batch where the caller has it (the training step does): reading device labels chunk by
chunk would wait for the device once per chunk.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minift.checks import check_int
from minift.names import IGNORE_INDEX
from minift.tracing import known


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels moved one to the left, IGNORE_INDEX in the last column: position t predicts t+1.

    Shifting the small integer labels instead of slicing the hidden states keeps the hidden
    states (B, T, H) a view, never a copy.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of next-token predictions: logits[:, t] predicts labels[:, t+1].

    The labels move, not the logits: slicing logits[:, :-1] would copy the (B, T, V) tensor
    and zero-fill a full-size gradient in backward. The last position has no next token, so
    it gets -100 and adds nothing. float32 logits go in as a view; others are upcast once.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), shift_labels(labels).flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed CE of lm_head(hidden) over chunks of rows; gradients formed in forward.

    forward(hidden (N, H), labels (N,), chunk, starts, head, *params) -> fp32 0-d loss sum, over
    the chunks beginning at ``starts`` (those with a scored token).
    backward(g) -> g * dL/dhidden, g * dL/dparams (kept from forward, in their own dtypes).
    """

    @staticmethod
    def forward(ctx, hidden, labels, chunk, starts, head, *params):
        want_h = ctx.needs_input_grad[0]
        want_p = [ctx.needs_input_grad[5 + i] for i in range(len(params))]
        grad_h, grad_p, total = _chunk_gradients(
            hidden, labels, chunk, starts, head, params, want_h, want_p,
            lambda logits, y, start: F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
        ctx.grads = (grad_h, grad_p)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_p = ctx.grads
        ctx.grads = None  # free the kept gradients as soon as they are handed on
        # t * g with g a 0-d fp32 tensor keeps t's dtype and multiplies in fp32
        scale = lambda t: None if t is None else t * g  # noqa: E731
        return (scale(grad_h), None, None, None, None, *[scale(t) for t in grad_p])


def scored_chunks(labels: torch.Tensor, chunk_size: int) -> tuple:
    """Where the chunks of ``chunked_loss_sum`` / ``chunked_row_logps`` over (N, T) unshifted
    ``labels`` begin that hold a scored token: flat token offsets, every one a multiple of
    ``chunk_size``.

    One read of the labels: free for the host copy of a micro-batch, one host-device sync for
    labels on a GPU (the training step passes the host copy). A planning trace's fake labels
    have no values: every chunk counts as scored.
    """
    chunk_size = check_int("loss_chunk_size", chunk_size)
    n = labels.numel()

    def read():  # on the host, with every dispatch mode off (minift.tracing.known)
        scored = (shift_labels(labels).reshape(-1) != IGNORE_INDEX)
        pad = -n % chunk_size
        if pad:
            scored = torch.cat([scored, scored.new_zeros(pad)])
        return tuple(start * chunk_size for start, hit in
                     enumerate(scored.view(-1, chunk_size).any(1).tolist()) if hit)
    return known(read, tuple(range(0, n, chunk_size)))


def chunked_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                     chunk_size: int, scored: Optional[tuple] = None) -> torch.Tensor:
    """Summed fp32 next-token cross-entropy of ``lm_head(hidden)`` a chunk of tokens at a time.

    Args:
        hidden: (B, T, H) final-norm hidden states.
        lm_head: any module mapping (N, H) -> (N, V): nn.Linear, LoRALinear, NF4Linear, a head
            whose weight is the tied embedding.
        labels: (B, T) unshifted labels, IGNORE_INDEX (-100) where nothing is trained.
        chunk_size: tokens per chunk (>= 1); need not divide B * T.
        scored: ``scored_chunks(labels, chunk_size)`` computed from a host copy of the labels;
            None reads ``labels`` (a host-device sync when they are on a GPU).

    Returns:
        0-d fp32 tensor: the same sum as ``token_loss_sum(lm_head(hidden), labels)``.
    """
    chunk_size = check_int("loss_chunk_size", chunk_size)
    if hidden.dim() != 3 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be (B, T, H) and labels (B, T); got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # a view: hidden is contiguous
    if flat.shape[0] <= chunk_size:
        # one chunk holds every token: the plain loss keeps two (N, V) float32 buffers at its
        # peak, the chunked one three (logits, their gradient formed in forward, its copy)
        return token_loss_sum(lm_head(hidden), labels)
    starts = scored_chunks(labels, chunk_size) if scored is None else tuple(scored)
    targets = shift_labels(labels).reshape(-1)
    params = [p for p in lm_head.parameters() if p.requires_grad and torch.is_grad_enabled()]
    return _ChunkedHeadLoss.apply(flat, targets, chunk_size, starts, lm_head, *params)


class _ChunkedRowLogps(torch.autograd.Function):
    """Per-row sums of log p(label) under lm_head(hidden), a chunk of tokens at a time.

    forward(hidden (N*T, H), labels (N*T,), T, N, chunk, starts, head, *params) -> (N,) fp32,
    over the chunks beginning at ``starts``.
    The incoming gradient is a vector (one weight per row), so nothing can be formed ahead:
    backward runs each chunk's lm_head again and back-propagates the weighted log-probs, which
    costs one more lm_head forward but never holds more than (chunk, V) logits. The backward
    replays the forward's RNG state, so a head with dropout (a LoRA lm_head) draws the masks of
    the forward again, as activation checkpointing does.
    """

    @staticmethod
    def forward(ctx, hidden, labels, t, n, chunk, starts, head, *params):
        ctx.save_for_backward(hidden, labels)
        ctx.t, ctx.chunk, ctx.starts, ctx.head, ctx.params = t, chunk, starts, head, params
        ctx.rng = _rng_state(hidden.device)
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for start in starts:
            y = labels[start:start + chunk]
            logits = head(hidden[start:start + chunk]).float()  # (chunk, V)
            nll = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
            out.index_add_(0, _rows(start, y, t), -nll)
            del logits
        return out

    @staticmethod
    def backward(ctx, g):
        hidden, labels = ctx.saved_tensors
        head, chunk, t, params = ctx.head, ctx.chunk, ctx.t, ctx.params
        ctx.head = ctx.params = None
        want_h = ctx.needs_input_grad[0]
        want_p = [ctx.needs_input_grad[7 + i] for i in range(len(params))]
        weights = g.float()
        with _replayed_rng(ctx.rng, hidden.device):
            grad_h, grad_p, _ = _chunk_gradients(
                hidden, labels, chunk, ctx.starts, head, params, want_h, want_p,
                lambda logits, y, start: -(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX,
                                                           reduction="none")
                                           * weights[_rows(start, y, t)]).sum())
        return (grad_h, None, None, None, None, None, None, *grad_p)


def _rng_state(device: torch.device) -> tuple:
    """The CPU RNG state, and the device's when it is a GPU: what dropout in the head draws from."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(state: tuple, device: torch.device):
    """Run the block from `state`; the RNG afterwards is as before the block."""
    cpu, gpu = state
    with torch.random.fork_rng(devices=[device] if gpu is not None else []):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
        yield


def _chunk_gradients(hidden, labels, chunk, starts, head, params, want_h, want_p, chunk_loss):
    """Gradients of the sum over chunks of ``chunk_loss(logits, labels, start)`` with respect to
    ``hidden`` and the wanted ``params``, holding one chunk's (chunk, V) fp32 logits at a time.

    Returns (grad_h (N, H) in hidden's dtype or None, [grad or None per param], fp32 loss sum).
    Only the chunks beginning at ``starts`` run: the others have no scored token and add nothing.
    """
    grad_h = torch.zeros_like(hidden) if want_h else None
    grad_p = [torch.zeros_like(p) if w else None for p, w in zip(params, want_p)]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in starts:
        y = labels[start:start + chunk]
        h = hidden[start:start + chunk].detach().requires_grad_(want_h)
        with torch.set_grad_enabled(want_h or any(want_p)):
            loss = chunk_loss(head(h).float(), y, start)  # the only logits alive
        total += loss.detach()
        inputs = ([h] if want_h else []) + [p for p, w in zip(params, want_p) if w]
        if inputs:
            grads = list(torch.autograd.grad(loss, inputs))
            if want_h:
                grad_h[start:start + chunk] = grads.pop(0)
            for i, w in enumerate(want_p):
                if w:
                    grad_p[i] += grads.pop(0)
        del loss
    return grad_h, grad_p, total


def _rows(start: int, y: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(start, start + y.shape[0], device=y.device) // t


def chunked_row_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                      chunk_size: int, scored: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token log-probabilities of each row, without the (N, T, V) logits.

    Args:
        hidden: (N, T, H) final-norm hidden states.
        lm_head: the head module (its trainable parameters get gradients).
        labels: (N, T) unshifted labels, IGNORE_INDEX where a token is not scored.
        chunk_size: tokens per chunk (>= 1).
        scored: ``scored_chunks(labels, chunk_size)`` of a host copy of the labels; None reads
            ``labels`` (a host-device sync when they are on a GPU). The backward reuses it.

    Returns:
        (logps, counts): (N,) fp32 sums of log p(label) with gradient, and (N,) token counts —
        what ``minift.objectives.dpo.sequence_logps`` gives from full logits.
    """
    logps, targets = _chunked_logps(hidden, lm_head, labels, chunk_size, scored, per_token=False)
    return logps, (targets != IGNORE_INDEX).sum(-1)


def chunked_token_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                        chunk_size: int, scored: Optional[tuple] = None) -> torch.Tensor:
    """Next-token log-probabilities of every position, without the (N, T, V) logits.

    ``chunked_row_logps`` with one "row" per token: position t of the result is
    log p(labels[t + 1]) under ``lm_head(hidden[t])``, 0 where that label is IGNORE_INDEX (and
    in the last column). The gradient flows to ``hidden`` and the head's trainable parameters,
    one (chunk, V) block of logits at a time in forward and again in backward.

    Args and ``scored``: as ``chunked_row_logps``. Returns (N, T) fp32.
    """
    logps, targets = _chunked_logps(hidden, lm_head, labels, chunk_size, scored, per_token=True)
    return logps.view(targets.shape)


def _chunked_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, chunk_size: int,
                   scored: Optional[tuple], per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks and chunk set-up shared by ``chunked_row_logps`` and ``chunked_token_logps``.

    Returns the flat fp32 log-prob sums (one per row of ``labels``, or one per token when
    ``per_token``) and the (N, T) shifted labels they score.
    """
    chunk_size = check_int("loss_chunk_size", chunk_size)
    if hidden.dim() != 3 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be (N, T, H) and labels (N, T); got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    n, t = labels.shape
    starts = scored_chunks(labels, chunk_size) if scored is None else tuple(scored)
    targets = shift_labels(labels)
    params = [p for p in lm_head.parameters() if p.requires_grad and torch.is_grad_enabled()]
    row_len, rows = (1, n * t) if per_token else (t, n)
    logps = _ChunkedRowLogps.apply(hidden.reshape(n * t, -1), targets.reshape(-1), row_len, rows, chunk_size,
                                   starts, lm_head, *params)
    return logps, targets


def model_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor,
                   chunk_size: Optional[int], scored: Optional[tuple] = None) -> torch.Tensor:
    """Summed token loss of ``model(**inputs)``: chunked when ``chunk_size`` is set, else full logits.

    ``scored`` is ``scored_chunks`` of a host copy of ``labels`` (see ``chunked_loss_sum``).

    The chunked path needs a model whose forward takes ``return_hidden=True`` and that has an
    ``lm_head`` module (minift's ``Llama``, also inside DDP). Under FSDP2 the head's parameters
    must still be gathered after the forward: ``minift.distributed.parallel.apply_parallel`` keeps the
    root unit (embedding, final norm, lm_head) unsharded from forward to backward for this.
    """
    if chunk_size is None:
        return token_loss_sum(model(**inputs), labels)
    owner = _unwrap(model)
    if not isinstance(getattr(owner, "lm_head", None), nn.Module):
        raise ValueError("loss_chunk_size is set, but the model has no 'lm_head' module; "
                         "set loss_chunk_size=None for models that only return logits")
    hidden = model(**inputs, return_hidden=True)  # (B, T, H); DDP's forward passes the flag on
    return chunked_loss_sum(hidden, owner.lm_head, labels, chunk_size, scored)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether ``model`` can return hidden states (``return_hidden=True``) and has an ``lm_head``.

    Models that only return logits (e.g. a user's own module) keep the full-logits loss.
    """
    model = _unwrap(model)
    try:
        takes = "return_hidden" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return takes and isinstance(getattr(model, "lm_head", None), nn.Module)
