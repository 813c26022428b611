"""Autoregressive generation with a KV cache: greedy or nucleus (top-p) sampling.

Batched prompts are left-padded so that every row's next token sits in the last column; the
attention mask hides the padding and positions count real tokens only, so a padded row produces
the same tokens as the same prompt alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from minift.models.llama import KVCache
from minift.nf4.inference import release_scratch


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: Union[int, Sequence[int], None] = None,
             pad_token_id: Optional[int] = None,
             attention_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None,
             stop: Optional[Callable[[torch.Tensor], bool]] = None) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a `minift.models.llama.Llama` (plain, LoRA-wrapped or NF4-quantized).
        input_ids: (B, T) prompt ids, left-padded when prompts differ in length.
        max_new_tokens: tokens to add at most.
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: sample only from the smallest set of tokens whose probability
            reaches top_p (1.0 keeps all).
        eos_token_id: id or ids that end a row; default the model config's eos_token_id.
        pad_token_id: fills a row after it ended; default the first eos id (or 0).
        attention_mask: (B, T), 1 for tokens and 0 for left padding; default all ones.
        generator: torch.Generator for reproducible sampling.
        stop: stop(ended) -> whether to stop decoding, given the 0-d bool tensor "every row of
            this batch has ended", after each new token; default ``bool(ended)``. Under torchrun
            a function that is True only once every rank's rows have ended keeps the ranks'
            forwards in step (rows that ended get ``pad_token_id``, as usual).

    Returns:
        LongTensor (B, T + n) with the prompts followed by n <= max_new_tokens new tokens (n is
        smaller when decoding stopped early).
    """
    attention_mask = _check_args(input_ids, max_new_tokens, temperature, top_p, attention_mask)
    eos = _eos_ids(model, eos_token_id, input_ids.device)
    _check_ids(input_ids, model.config.vocab_size)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _decode(model, input_ids, attention_mask, max_new_tokens, temperature, top_p,
                           eos, pad_token_id, generator, stop or bool)
    finally:
        model.train(was_training)
        release_scratch()  # NF4's CPU decoding buffer: one weight's worth, not kept past the call


def _decode(model, ids, mask, max_new_tokens, temperature, top_p, eos, pad_id, generator, stop=bool):
    cache = KVCache(model.config.num_hidden_layers)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_ids, step_pos, out = ids, positions, [ids]
    for _ in range(max_new_tokens):
        logits = next_logits(model, step_ids, mask, step_pos, cache)
        token = _pick(logits[:, -1].float(), temperature, top_p, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token[:, None])
        done = done | torch.isin(token, eos)
        if stop(done.all()):
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.cat(out, dim=1)


def next_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """(B, 1, V) logits of the last position of ``ids`` (the cache extended by all of them): the
    prefill of a long prompt applies lm_head to one position per row, not to every position (at
    Llama-3's vocabulary 16 prompts of 512 tokens would hold 2 GiB of bf16 logits)."""
    if not hasattr(model, "lm_head"):  # any other causal model: its logits of every position
        return model(ids, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, -1:]
    hidden = model(ids, attention_mask=mask, position_ids=positions, kv_cache=cache, return_hidden=True)
    return model.lm_head(hidden[:, -1:])


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from (B, V) float32 logits."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first one stays.
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _eos_ids(model, eos_token_id, device) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """One check (one sync on CUDA) before decoding: an out-of-range id would otherwise fail deep
    inside the embedding with an index error that names nothing."""
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise ValueError(f"input_ids holds token id {int(bad)}, outside the model's vocabulary of "
                         f"{vocab_size} (ids 0..{vocab_size - 1})")


def _check_args(input_ids, max_new_tokens, temperature, top_p, attention_mask) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                         f"input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.long()
    # Left padding only: once a row has a token, no padding may follow.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding after tokens; generate needs left-padded "
                         "prompts (pad at the start of each row)")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("attention_mask has a row with no tokens at all")
    return mask
