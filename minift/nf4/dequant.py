"""Fast NF4 dequantization on CPU, bit-identical to ``minift.nf4.quantize._dequantize_reference``.

The reference splits every byte into two nibbles (stack, int64 indices), looks each up in the
16-level code, repeats the block scales element by element (``repeat_interleave``) and then
multiplies: five full-size temporaries per weight. Here a byte indexes a 256-entry table of
level *pairs* (high nibble, low nibble), stored as one int64 per byte so a single 1-D gather
writes both float32 values; the block scales broadcast through a (blocks, blocksize) view; and
the work runs in slices of a few hundred KiB, so the float32 values are still in cache when they
are scaled and rounded to the output dtype. The arithmetic is the reference's: one float32
product ``code[nibble] * absmax`` per element, rounded once to the output dtype.
"""
from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

# Values per slice: a float32 slice of 1 MiB sits in a core's 2 MiB L2 while it is scaled and
# converted (measured on a 2-core Xeon: 256 Ki values was the fastest of 16 Ki .. 1 Mi).
SLICE = 1 << 18
# With several torch threads the slices shrink below torch's grain size (32768 elements), so
# every op runs inline on the calling thread: a slice op above it opens a parallel region whose
# barrier, on a busy CPU, waits for a descheduled thread (measured 5-30x slower with 2 threads
# than with 1 on a loaded 2-core EPYC, AVX2 and AVX-512 kernels alike). Running the small slices
# on Python threads instead measured no faster there: each op is too short to hide the GIL.
THREAD_SLICE = 3 << 13


def _pair_table_cached_impl(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)  # (16,)
    # Row b holds (code[b >> 4], code[b & 15]): the even element sits in the high nibble.
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2)
    return pairs.contiguous().view(torch.int64).view(-1)  # (256,): both floats in one word


@functools.lru_cache(maxsize=8)
def _pair_table_cached(code_bytes: bytes) -> torch.Tensor:
    with unset_fake_temporarily():  # cached: real even when first built in a planning trace
        return _pair_table_cached_impl(code_bytes)


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 (256,): entry b is the float32 pair (code[b >> 4], code[b & 15]) in one word."""
    with unset_fake_temporarily():  # code books are real tensors in a planning trace too
        return _pair_table_cached(code.detach().float().cpu().contiguous().numpy().tobytes())


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape,
                      blocksize: int, dtype: torch.dtype, out: torch.Tensor | None = None):
    """NF4 bytes -> a ``dtype`` tensor of ``shape`` (CPU tensors).

    Args:
        packed: uint8, ceil(n / 2) bytes; byte k holds element 2k (high nibble) and 2k + 1.
        absmax: float32 (ceil(n / blocksize),) block scales, already decoded.
        code: the 16 NF4 levels (float32).
        shape, blocksize, dtype: the weight's shape, its block size and the output dtype.
        out: optional contiguous output of that shape and dtype (checked by the caller).
    """
    n = int(torch.Size(shape).numel())
    out = torch.empty(shape, dtype=dtype) if out is None else out
    flat, data = out.view(-1), packed.reshape(-1)
    table = pair_table(code)
    full = n - n % blocksize if blocksize % 2 == 0 else 0  # whole blocks, each a whole byte run
    per_slice = SLICE if torch.get_num_threads() == 1 else min(SLICE, THREAD_SLICE)
    step = max(per_slice // blocksize, 1) * blocksize  # a multiple of the block size: scales align
    idx = torch.empty(min(step, full) // 2, dtype=torch.int32)  # index_select wants int32/int64
    direct = dtype == torch.float32 and flat.storage_offset() % 2 == 0  # int64 view of the output
    words = None if direct else torch.empty(min(step, full) // 2, dtype=torch.int64)
    for a in range(0, full, step):
        b = min(a + step, full)
        i = idx[:(b - a) // 2].copy_(data[a // 2:b // 2])
        # float32 output: gather straight into it; else into a slice-sized scratch first
        dst = flat[a:b].view(torch.int64) if words is None else words[:(b - a) // 2]
        values = torch.index_select(table, 0, i, out=dst).view(torch.float32).view(-1, blocksize)
        values.mul_(absmax[a // blocksize:b // blocksize, None])  # (blocks, blocksize) * (blocks, 1)
        if words is not None:
            flat[a:b].view(-1, blocksize).copy_(values)  # the one rounding to dtype
    if full < n:  # the partial last block
        tail = torch.index_select(table, 0, data[full // 2:].to(torch.int32)).view(torch.float32)
        scale = absmax[full // blocksize:].repeat_interleave(blocksize)[:n - full]
        flat[full:].copy_(tail[:n - full] * scale)
    return out
