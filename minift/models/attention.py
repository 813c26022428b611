"""Attention masks for every batch shape, decided once per forward and shared by all layers.

A batch is plain causal (no padding, no packed samples, no window in reach), padded, packed
(several samples per row, `segment_ids` 1..k, 0 = padding) or longer than a sliding window.
Two ways to run the masked shapes:

- "sdpa": a dense boolean mask (B, 1, Tq, Tk) for `F.scaled_dot_product_attention`. On a GPU,
  SDPA's fused kernels do not take an explicit mask together with `enable_gqa=True`, so GQA
  models (Llama 3, Mistral, Qwen2) fall back to the math kernel and materialise B*H*T^2 scores
  per layer. Used on CPU and for decoding with a KV cache (one query row per step).
- "flex": FlexAttention with a `BlockMask` built once per forward. The kernel skips every
  (128 x 128) block with no allowed pair, so a packed row of samples of length L costs
  O(T * L), not O(T^2), and a sliding window of W costs O(T * W). GQA runs in the kernel.
  The block mask is built from per-block summaries of the padding and sample ids, never from a
  dense mask: O(B * (T / 128)^2) block tables, 4 MiB at B 2 and T 64k.

The plain causal shape always takes SDPA's `is_causal=True` path (flash attention on a GPU).

Shifted sparse attention (S²-Attn, LongLoRA; training only) is one more constraint on any of
these shapes: tokens attend only within groups of G positions; heads [0, H//2) use the groups
[0, G), [G, 2G), ..., heads [H//2, H) the groups shifted by s = G//2: [0, G - s), [G - s, 2G - s),
..., so the first and last half-groups stand alone (causal; no group wraps around the row). On
"flex" the block tables are per head and a query block visits O(G) keys: O(T * G) work. On
"sdpa" the dense mask is (B, 2, T, T), one per half of the heads, and the halves take one SDPA
call each.
"""
from __future__ import annotations

import functools
import warnings
from typing import Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from minift.tracing import known, on_cuda, tracing

ATTENTION_IMPLS = ("auto", "sdpa", "flex")


# What every layer of one forward attends with: None (plain causal), a dense boolean mask
# (B, 1, Tq, Tk), True = may attend ((B, 2, Tq, Tk) under S²-Attn: the first for heads [0, H//2),
# the second for the rest), or a flex BlockMask. The dense mask stays a plain tensor so
# that gradient checkpointing sees it as an input of each layer, as before.
BatchMask = Union[None, torch.Tensor, BlockMask]


S2_SHARE = 4  # S²-Attn's default group: a quarter of the forward's length (LongLoRA's 1/4)


def s2_group_size(t: int, group_size=None) -> int:
    """S²-Attn's group size G for a forward of T tokens: `group_size`, or ceil(T / 4) when None."""
    return group_size if group_size is not None else max(1, -(-t // S2_SHARE))


def s2_group_start(pos: torch.Tensor, group_size: int, shift: int) -> torch.Tensor:
    """First position of each position's group: groups of `group_size` positions starting at
    -`shift` (shift 0: [0, G), [G, 2G), ...; shift s: [0, G - s), [G - s, 2G - s), ...)."""
    return ((pos + shift) // group_size * group_size - shift).clamp(min=0)


def _same_s2_group(q_pos, k_pos, group_size: int) -> torch.Tensor:
    """(2, Tq, Tk) bool: query and key in one group, unshifted (0) and shifted by G // 2 (1)."""
    shifts = torch.tensor([0, group_size // 2], device=q_pos.device)[:, None]
    q_group, k_group = (q_pos + shifts) // group_size, (k_pos + shifts) // group_size
    return q_group[:, :, None] == k_group[:, None, :]


def attention_mask_4d(q_pos, k_pos, key_valid=None, q_seg=None, k_seg=None, window=None,
                      s2_group=None):
    """Boolean mask (B, 1, Tq, Tk): True where a query may attend to a key.

    Args are index tensors: q_pos (Tq,), k_pos (Tk,) absolute cache positions; key_valid (B, Tk)
    bool; q_seg (B, Tq), k_seg (B, Tk) packed-sample ids (0 = padding). With `s2_group` (S²-Attn's
    group size G) the mask is (B, 2, Tq, Tk): [:, 0] for heads [0, H//2), groups [kG, (k+1)G);
    [:, 1] for the other heads, groups shifted by G // 2.
    """
    allowed = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk) causal
    if window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if s2_group is not None:
        allowed = allowed & _same_s2_group(q_pos, k_pos, s2_group)[None]  # (1, 2, Tq, Tk)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if q_seg is not None:
        same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)  # (B, Tq, Tk)
        allowed = allowed & same[:, None]
    # A padding query may see no key at all; letting it see itself keeps softmax finite (its
    # output is never used).
    return allowed | (k_pos[None, :] == q_pos[:, None])[None, None]


def flex_block_mask(batch: int, t: int, key_valid=None, segment_ids=None, window=None,
                    device=None, block_size: int = 128, s2_group=None, heads=None) -> BlockMask:
    """The `BlockMask` of a forward without a cache: the same pairs as `attention_mask_4d`.

    Built from per-block summaries of the (B, T) inputs, never from the dense (B, T, T) mask:
    the largest tensors are the (B, T/block_size, T/block_size) block tables.

    Args:
        batch, t: the batch size B and sequence length T (queries = keys, positions 0..T-1).
        key_valid: (B, T) bool, False at padding; None = no padding.
        segment_ids: (B, T) packed-sample ids (> 0), 0 at padding; None = one sample per row.
        window: sliding window in tokens, or None.
        block_size: flex's tile edge; blocks with no allowed pair are never visited.
        s2_group, heads: S²-Attn's group size G and the number of query heads H; the tables are
            then per head, (B, H, N, N): heads [0, H//2) unshifted, the rest shifted by G // 2.
    """
    if s2_group is not None and not heads:
        raise ValueError("flex_block_mask: s2_group needs heads, the number of query heads")
    shift = s2_group // 2 if s2_group is not None else 0
    first_shifted = heads // 2 if s2_group is not None else 0

    def mask_mod(b, h, q, k):  # scalar indices, vmapped by flex
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        if s2_group is not None:
            s = (h >= first_shifted) * shift
            allowed = allowed & ((q + s) // s2_group == (k + s) // s2_group)
        if key_valid is not None:
            allowed = allowed & key_valid[b, k]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[b, q] == segment_ids[b, k]) & (segment_ids[b, k] > 0)
        return allowed | (q == k)  # as attention_mask_4d: a padding query sees itself

    if device is None:
        given = key_valid if key_valid is not None else segment_ids
        device = given.device if given is not None else \
            torch.accelerator.current_accelerator() or "cpu"  # create_block_mask's default
    per_row = key_valid is not None or segment_ids is not None
    device = torch.device(device)

    def kinds(group):
        return _block_kinds(batch if per_row else 1, t, key_valid, segment_ids, window, device,
                            block_size, group)

    if s2_group is None:
        partial, full = (kind[:, None] for kind in kinds(None))  # (B, 1, N, N): all heads alike
    else:  # (B, H, N, N): the unshifted pattern for heads [0, H//2), the shifted one for the rest
        both = [kinds((s2_group, 0)), kinds((s2_group, shift))]
        pattern = (torch.arange(heads, device=device) >= first_shifted).long()
        partial, full = (torch.stack(kind, 1).index_select(1, pattern) for kind in zip(*both))
    # The attention kernel calls mask_mod only inside partial blocks; full ones need no call.
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(t, t))


def _ordered(blocks: torch.Tensor):
    """(B, H, Nq, Nk) bool block map -> flex's (B, H, Nq) counts and (B, H, Nq, Nk) kv indices:
    per query block the kept kv blocks in ascending order, then the others (as create_block_mask)."""
    blocks = blocks.to(torch.int32)
    indices = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), indices.to(torch.int32)


def _first_occurrence(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T) position of each token's id's first occurrence in its row."""
    values, order = torch.sort(seg, dim=-1, stable=True)  # equal ids keep position order
    pos = torch.arange(seg.shape[-1], device=seg.device).expand_as(seg)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group_start = torch.where(starts, pos, 0).cummax(-1).values  # sorted index of the id's first
    return torch.empty_like(order).scatter_(-1, order, order.gather(-1, group_start))


def _block_kinds(b, t, key_valid, segment_ids, window, device, bs, group=None):
    """Which (query block, kv block) pairs of each row hold an allowed pair: (partial, full),
    each (B, N, N) bool with N = ceil(T / bs); a full block allows all of its bs x bs pairs.

    Exact (the same blocks as create_block_mask) when every sample's tokens are contiguous;
    otherwise some empty blocks may be kept as partial (mask_mod still masks them), never the
    reverse. A query q may see key k < q iff k is valid and in q's sample and q - k < window
    and (S²-Attn, `group` = (G, shift)) k is in q's group: with contiguous samples those keys
    are the valid ones of [lo(q), q], lo(q) = max(start of q's sample, q - window + 1, start of
    q's group). Keys in the diagonal block are decided by mask_mod.
    """
    n = -(-t // bs)
    pos = torch.arange(t, device=device)
    ok = torch.ones(b, t, dtype=torch.bool, device=device)  # keys anyone may attend to
    if key_valid is not None:
        ok = ok & key_valid.to(device=device, dtype=torch.bool)
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)
    if group is not None:
        lo = torch.maximum(lo, s2_group_start(pos, *group))
    lo = lo.expand(b, t)
    if segment_ids is not None:
        seg = segment_ids.to(device)
        ok = ok & (seg > 0)
        # The id's first occurrence: its sample's start when samples are contiguous, and before
        # every key of the same id otherwise (a superset of q's keys: only ever more blocks).
        lo = torch.where(seg > 0, torch.maximum(lo, _first_occurrence(seg)), pos + 1)
    valid_before = F.pad(ok.cumsum(-1, dtype=torch.int32), (1, 0))  # (B, T + 1): valid keys < i
    blk = torch.arange(n, device=device)
    first, last = blk * bs, (blk * bs + bs).clamp(max=t) - 1  # each block's positions in range
    below = blk[:, None] > blk[None, :]  # (N, N): kv block wholly before the query block
    diagonal = blk[:, None] == blk[None, :]

    # Some pair is allowed iff the query block's smallest lo leaves a valid key in the kv block:
    # valid keys in [max(lo, first), last] of each (query block, kv block).
    lo_min = F.pad(lo, (0, n * bs - t), value=t).view(b, n, bs).amin(-1)  # (B, N)
    start = torch.maximum(lo_min[:, :, None], first).view(b, n * n)  # (B, N*N), at most T
    hits = valid_before[:, last + 1].repeat(1, n) - valid_before.gather(-1, start)
    nonempty = below & (hits.view(b, n, n) > 0) | diagonal  # the diagonal: q == k is allowed

    # Every pair allowed: whole blocks (create_block_mask pads the last one with False), every
    # key valid, all within the window, and one sample id over both blocks.
    keys_all_valid = valid_before[:, last + 1] - valid_before[:, first] == bs  # (B, N)
    full = below & (last - first + 1 == bs)[:, None] & keys_all_valid[:, None, :]
    if window is not None:
        full = full & (last[:, None] - first[None, :] < window)
    if group is not None:  # every key of the kv block in the group of the query block's last
        full = full & (first[None, :] >= s2_group_start(last, *group)[:, None])
    if segment_ids is not None:
        padded = F.pad(seg, (0, n * bs - t), value=-1).view(b, n, bs)  # -1: outside the row
        lowest, highest = padded.amin(-1), padded.amax(-1)
        one_id = (lowest == highest)
        full = full & one_id[:, :, None] & one_id[:, None, :] & (lowest[:, :, None] == lowest[:, None, :])
    if bs == 1:
        full = full | diagonal  # a 1 x 1 diagonal block is the pair q == k
    return nonempty & ~full, full


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    # flex_attention is fast only compiled (eager materialises the scores). Compiled once per
    # process; inside a compiled decoder layer dynamo inlines it into the layer's graph.
    return torch.compile(flex_attention)


# ---- FlexAttention in a planning trace of the CUDA path (minift.tracing) --------------------------
# The compiled kernel cannot run on fake tensors, and torch has no CPU flex backward. These ops
# stand in for it: their fake implementations allocate what the kernel allocates. Forward: the
# output and one float32 log-sum-exp per (batch, head, query), both kept for backward together
# with the block mask's tables (the kernel's backward walks them; S²-Attn's are per head).
# Backward: a float32 (B, H, T) row sum of dO * O, then dq and dk, dv in the keys' own shape (GQA
# is handled inside the kernel). They have no real implementation.
@torch.library.custom_op("minift::flex_attention_planned", mutates_args=())
def _flex_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  tables: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("minift::flex_attention_planned stands in for FlexAttention in planning traces "
                       "only; it has no kernel")


@_flex_planned.register_fake
def _(q, k, v, tables):
    # the kernel's output takes the query's memory order (a transposed (B, T, H, D) query gives a
    # (B, T, H, D)-ordered output, whose reshape to (B, T, H * D) is free)
    out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minift::flex_attention_planned_backward", mutates_args=())
def _flex_planned_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor,
                           tables: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise RuntimeError("minift::flex_attention_planned_backward stands in for FlexAttention in planning "
                       "traces only; it has no kernel")


@_flex_planned_backward.register_fake
def _(dout, q, k, v, out, lse, tables):
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    del delta
    return dq, dk, dv


def _flex_planned_setup(ctx, inputs, output):
    q, k, v, tables = inputs
    ctx.save_for_backward(q, k, v, *output, *tables)


def _flex_planned_grad(ctx, dout, dlse):
    q, k, v, out, lse, *tables = ctx.saved_tensors
    dq, dk, dv = torch.ops.minift.flex_attention_planned_backward(dout, q, k, v, out, lse, tables)
    return dq, dk, dv, [None] * len(tables)


_flex_planned.register_autograd(_flex_planned_grad, setup_context=_flex_planned_setup)


def flex_attend(q, k, v, block: BlockMask) -> torch.Tensor:
    """FlexAttention of q (B, H, T, D) over k, v (B, KV, T, D) -> (B, H, T, D).

    On CUDA the compiled kernel; elsewhere flex's eager reference (forward only: torch has no
    CPU flex backward), which is how the CPU tests check this path against the dense one. A
    planning trace of the CUDA path takes the stand-in ops above.
    """
    gqa = k.shape[1] != q.shape[1]
    if on_cuda(q) and tracing():
        tables = [t for t in block.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
        return torch.ops.minift.flex_attention_planned(q, k, v, tables)[0]
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager flex warns that it is unfused; known and wanted here
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block, enable_gqa=gqa)


def attend(q, k, v, mask: BatchMask) -> torch.Tensor:
    """Attention of q (B, H, Tq, D) over k, v (B, KV, Tk, D) under `mask` -> (B, H, Tq, D)."""
    if isinstance(mask, BlockMask):
        return flex_attend(q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask.shape[1] == 2:  # S²-Attn: one mask per half of the heads
        return _attend_halves(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _attend_halves(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of heads [0, H//2) under mask[:, :1] and of the rest under mask[:, 1:], in two calls.
    With GQA each call takes the KV heads of its query heads; a KV head whose query heads fall in
    both halves is repeated for each of its query heads."""
    h, kv = q.shape[1], k.shape[1]
    half, per = h // 2, h // kv  # query heads per KV head
    if half % per:
        k, v, per = k.repeat_interleave(per, 1), v.repeat_interleave(per, 1), 1
    outs = []
    for heads, keys, m in ((slice(0, half), slice(0, half // per), mask[:, :1]),
                           (slice(half, h), slice(half // per, None), mask[:, 1:])):
        qh, kh, vh = q[:, heads], k[:, keys], v[:, keys]
        if qh.shape[1]:
            outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m,
                                                       enable_gqa=kh.shape[1] != qh.shape[1]))
    return torch.cat(outs, 1)


def batch_mask(t: int, past: int, attention_mask, segment_ids, window, device,
               use_flex: bool, s2_group=None, heads=None) -> BatchMask:
    """Choose and build the mask of one forward of T new tokens after `past` cached ones.

    The choice never reads tensor values on the device (no host-device sync): an all-ones
    `attention_mask` is recognised only when it lives on the host, where reading it is free;
    callers that know a batch is unpadded pass None instead (the training loop does).

    Args:
        attention_mask: (B, past + T) 1 = token, 0 = padding, or None.
        segment_ids: (B, T) packed-sample ids, or None.
        window: the model's sliding window, or None.
        use_flex: take FlexAttention for masked shapes without a cache.
        s2_group, heads: S²-Attn's group size G (None = full attention) and the number of query
            heads; a forward without a cache only.
    """
    if s2_group is not None and past:
        raise ValueError("S²-Attn (s2_group) applies to forwards without a KV cache (training)")
    if window is not None and past + t <= window:
        window = None  # the window cannot cut anything yet
    if (attention_mask is not None and segment_ids is None and past == 0
            and attention_mask.device.type == "cpu" and not on_cuda(attention_mask)
            and known(lambda: attention_mask.all(), False)):
        attention_mask = None  # nothing padded (read on the host): keep the fused causal kernel
    if attention_mask is None and segment_ids is None and window is None and past == 0 \
            and s2_group is None:
        return None  # plain causal: SDPA's is_causal path
    key_valid = attention_mask.bool() if attention_mask is not None else None
    if use_flex and past == 0:
        b = attention_mask.shape[0] if attention_mask is not None else \
            segment_ids.shape[0] if segment_ids is not None else 1
        return flex_block_mask(b, t, key_valid, segment_ids, window, device, s2_group=s2_group,
                               heads=heads)
    k_pos = torch.arange(past + t, device=device)
    return attention_mask_4d(k_pos[past:], k_pos, key_valid, segment_ids, segment_ids, window,
                             s2_group)
