"""Blockwise 8-bit dynamic quantization and the pure-torch AdamW step on 8-bit states.

This is the reference for ``minift.kernels.adamw8bit`` (the CPU path and the test oracle), written
op by op in the same order and precision as the kernel so both give the same bits in Triton's
interpreter. Method: "8-bit Optimizers via Block-wise Quantization" (Dettmers et al., 2022):
a tensor is cut into blocks of 256 elements; each block stores one float32 absmax and, per
element, the uint8 index of the map entry nearest to ``x / absmax``.

The step, per element, all in float32 (``p`` is the parameter, ``g`` its gradient)::

    m = dequant(m8) ; v = dequant(v8)                 # signed map for m, unsigned for v
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p * (1 - lr * weight_decay)                    # decoupled decay first, as torch AdamW
    p = p - (m / (sqrt(v) * (1 / sqrt(1 - beta2**t)) + eps)) * (lr / (1 - beta1**t))
    m8 = quant(m) ; v8 = quant(v)                      # fresh absmax per block

The bias correction of v is a multiplication by ``1 / sqrt(1 - beta2**t)`` (computed on the host
in float64, rounded once to float32), not a division by ``sqrt(1 - beta2**t)``: torch on CUDA
turns a division by a Python scalar into a multiplication by its reciprocal while the CPU
divides, so only the multiplication gives the same bits on CPU, on CUDA and in the kernel.
"""
from __future__ import annotations

import functools
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _get_current_dispatch_mode

BLOCK = 256  # elements per absmax block (the paper's block size; also the kernel's program size)

# Constants of the integer hash behind stochastic rounding (shared with the kernel).
_GOLDEN = 0x9E3779B1
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_MASK32 = 0xFFFFFFFF


def num_blocks(n: int) -> int:
    """Number of absmax blocks for ``n`` elements."""
    return (n + BLOCK - 1) // BLOCK


def nearest_code(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the entry of the sorted ``code`` nearest to each value of ``y``.

    Ties go to the lower entry. ``lo`` is the last entry <= y (clamped to [0, 255]), exactly what
    the kernel's 8-step binary search finds, so both pick the same index.
    """
    lo = (torch.searchsorted(code, y, right=True) - 1).clamp(0, code.numel() - 1)
    hi = (lo + 1).clamp(max=code.numel() - 1)
    take_hi = (code[hi] - y) < (y - code[lo])
    return torch.where(take_hi, hi, lo).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to (codes uint8 (n,), absmax float32 (ceil(n/256),)).

    Args:
        x: any shape; read as float32 and flattened.
        code: the 256-entry sorted map (``minift.quantmaps.dynamic_map``) on x's device.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK - n))  # zero tail
    blocks = padded.view(-1, BLOCK)  # (n_blocks, 256)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block keeps absmax 0 and divides by 1 so it stores exact zeros, not NaN.
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_code(blocks / scale[:, None], code)
    return codes.reshape(-1)[:n].contiguous(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: float32 (n,) = code[codes] * absmax of the block."""
    n = codes.numel()
    block_scale = absmax.repeat_interleave(BLOCK)[:n]  # (n,)
    return code[codes.long()] * block_scale


@dataclass(frozen=True)
class StepScalars:
    """Per-step scalars, computed once on the host in float64 and read as float32 by the math."""

    beta1: float
    one_minus_beta1: float  # rounded once from float64, as the kernel receives it
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float  # 1 - lr * weight_decay
    step_size: float  # lr / (1 - beta1**t)
    inv_bc2_sqrt: float  # 1 / sqrt(1 - beta2**t)
    seed: int  # stochastic-rounding seed for this step and tensor, in [0, 2**31)

    @classmethod
    def make(cls, lr, beta1, beta2, eps, weight_decay, step, seed=0):
        return cls(beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step),
                   1.0 / math.sqrt(1.0 - beta2**step), int(seed))


def adamw_math(p, g, m, v, s: StepScalars):
    """The AdamW update on float32 tensors; returns new (p, m, v). Order as in the module doc."""
    m = m * s.beta1 + g * s.one_minus_beta1
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    p = p * s.decay
    # sqrt in float64, rounded once to float32: the correctly rounded float32 sqrt, as CUDA and
    # the kernel's sqrt_rn give. torch's float32 sqrt on an AVX-512 CPU is not always: for
    # v = 3.9696565e-06 it returned 0.0019923995714634657, one ulp below 0.0019923998042941093.
    root = torch.sqrt(v.double()).float()
    denom = root * s.inv_bc2_sqrt + s.eps  # a product, never "/ scalar": see the module doc
    p = p - (m / denom) * s.step_size
    return p, m, v


def hash_bits(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """16 pseudo-random bits per element offset (int64 tensor), a pure function of (offset, seed).

    The integer hash "lowbias32" (C. Wellons) on uint32 words, emulated in int64 with masks; the
    kernel computes the same hash on uint32, so stochastic rounding is reproducible and equal.
    """
    x = (offsets * _GOLDEN + seed) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    x = x ^ (x >> 16)
    return x & 0xFFFF


def round_to_param(p32: torch.Tensor, dtype: torch.dtype, seed: int, offset: int, stochastic: bool):
    """Cast the updated float32 weights to the parameter dtype.

    Stochastic rounding (bf16 only): add 16 random bits below the bf16 mantissa, then truncate. The
    float32 bit pattern is sign-magnitude, so this rounds the magnitude up with probability equal
    to the dropped fraction, for either sign: small updates survive on average.
    """
    if not (stochastic and dtype == torch.bfloat16):
        return p32.to(dtype)
    offsets = torch.arange(offset, offset + p32.numel(), device=p32.device, dtype=torch.int64)
    bits = (p32.view(torch.int32).to(torch.int64) & _MASK32) + hash_bits(offsets, seed)  # uint32
    bits = bits & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # back to signed int32
    return bits.view(torch.float32).to(dtype)  # exact: the low 16 bits are zero


def adamw8bit_step_reference(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v,
                             s: StepScalars, offset: int = 0, stochastic: bool = False) -> None:
    """One AdamW step on a flat parameter slice with 8-bit states, in place.

    Args:
        p: parameter, 1-D contiguous (n,), float32/bfloat16/float16; updated in place.
        g: gradient (n,), any float dtype.
        m_codes, v_codes: uint8 (n,); m_absmax, v_absmax: float32 (ceil(n/256),); updated in place.
        map_m, map_v: the signed and unsigned 256-entry maps.
        s: the step scalars.
        offset: element offset of ``p`` in its full tensor (a multiple of 256 when slicing), so
            stochastic rounding of a slice equals that of the whole tensor.
        stochastic: stochastic rounding for bfloat16 parameters.
    """
    m = dequantize_blockwise(m_codes, m_absmax, map_m)
    v = dequantize_blockwise(v_codes, v_absmax, map_v)
    p32, m, v = adamw_math(p.float(), g.float(), m, v, s)
    p.copy_(round_to_param(p32, p.dtype, s.seed, offset, stochastic))
    new_m, new_am = quantize_blockwise(m, map_m)
    new_v, new_av = quantize_blockwise(v, map_v)
    m_codes.copy_(new_m)
    m_absmax.copy_(new_am)
    v_codes.copy_(new_v)
    v_absmax.copy_(new_av)


def adamw32_step(p, g, exp_avg, exp_avg_sq, s: StepScalars, stochastic: bool = False,
                 offset: int = 0) -> None:
    """The same step with float32 states (small tensors), in place; any shape. ``offset`` is the
    flat index of p's first element in its whole parameter (a shard's), for stochastic rounding."""
    p32, m, v = adamw_math(p.float(), g.float(), exp_avg, exp_avg_sq, s)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    p.copy_(round_to_param(p32.reshape(-1), p.dtype, s.seed, offset, stochastic).view_as(p))


# ---- the fast CPU step ------------------------------------------------------------------
# The reference spends most of its time in searchsorted over the 256-entry map and in
# allocating a dozen full-size temporaries. The fast step below gives the same bits (tests
# compare it with the reference above) by
#   * requantizing through a table indexed by the top 16 bits of the float32 value y = x/absmax
#     (sign, exponent, 7 mantissa bits): within such a bucket the reference's answer takes at most
#     two values, split at one threshold, so one compare replaces the 8-step search;
#   * walking the tensor in chunks with preallocated buffers and in-place ops, so the
#     temporaries stay in cache and nothing of full size is allocated;
#   * with several torch threads, running the chunks on that many Python threads, each chunk
#     smaller than torch's grain size (32768 elements) so that every op runs inline in its thread.
#     Chunked ops above the grain size each open a parallel region whose threads meet at a
#     barrier: ~25 regions per chunk, and on a busy CPU every barrier waits for a descheduled
#     thread (measured 5-10x slower with 2 threads than with 1 on a loaded 2-core EPYC). Python
#     threads meet once per tensor; torch releases the GIL inside each op.
CHUNK = 1 << 16  # elements per pass on one thread: about 8 buffers of 256 KiB, within L2
THREAD_CHUNK = 3 << 13  # elements per pass with several threads: below torch's grain size
_PREFIXES = 1 << 16  # table entries: every value of the top 16 bits of a float32
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which uint16 of a float32 holds its top bits


def _bucket_values(prefix: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Float32: in the bucket of each top-16-bit ``prefix`` (int64), its value of the given rank.

    Rank 0 is the smallest value of the bucket; a negative bucket grows as its low bits shrink.
    """
    low = torch.where(prefix >= 0x8000, 0xFFFF - rank, rank)
    bits = (prefix << 16) | low
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _requant_table_cached_impl(code_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    nearest = lambda y: nearest_code(y, code).long()  # noqa: E731
    prefix = torch.arange(_PREFIXES, dtype=torch.int64)
    low_code = nearest(_bucket_values(prefix, torch.zeros_like(prefix)))
    high_code = nearest(_bucket_values(prefix, torch.full_like(prefix, 0xFFFF)))
    # The buckets of inf and NaN are not ordered by rank: decided below by the reference.
    finite = (prefix & 0x7F80) != 0x7F80
    split = torch.nonzero((low_code != high_code) & finite)[:, 0]  # ~250 buckets per map
    # Bisect the split buckets for the first rank whose code differs from the bucket's first.
    lo, hi = torch.zeros_like(split), torch.full_like(split, 0xFFFF)
    for _ in range(16):
        mid = (lo + hi) // 2
        moved = nearest(_bucket_values(split, mid)) != low_code[split]
        hi, lo = torch.where(moved, mid, hi), torch.where(moved, lo, mid + 1)
    threshold = torch.full((_PREFIXES,), math.inf)
    threshold[split] = _bucket_values(split, hi)
    if not torch.equal(nearest(threshold[split]), high_code[split]):
        raise ValueError("quant8: the code map splits a table bucket twice")  # finer than 2**-7
    high_code = torch.where(threshold < math.inf, high_code, low_code)
    nan = nearest(torch.tensor([math.nan]))
    for top, edge in ((0x7F80, math.inf), (0xFF80, -math.inf)):
        low_code[top:top + 0x80] = high_code[top:top + 0x80] = nan
        edge_code = nearest(torch.tensor([edge]))
        if edge_code != nan:  # y >= edge holds for the infinity alone, never for NaN
            threshold[top], high_code[top] = edge, edge_code
    return threshold, torch.cat([low_code, high_code]).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _requant_table_cached(code_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    with unset_fake_temporarily():  # cached: real even when first built in a planning trace
        return _requant_table_cached_impl(code_bytes)


def requant_table(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables that give ``nearest_code(y, code)`` without a search, for every float32 ``y``.

    Returns (threshold float32 (65536,), codes uint8 (131072,)): with b the top 16 bits of y,
    ``nearest_code(y) == codes[b + 65536 * (y >= threshold[b])]``. Built once per map (bisection
    over the reference itself, so ties and the rounding of its subtractions carry over).
    """
    return _requant_table_of(code)


def packed_requant_table(code: torch.Tensor) -> torch.Tensor:
    """``requant_table`` in one int32 word per bucket, so the kernel needs one gather per value.

    Word ``b`` holds the low 16 bits of ``threshold[b]`` (bits 0-15), ``codes[b]`` (bits 16-23) and
    ``codes[b + 65536]`` (bits 24-31). That is all of the table because a bucket's threshold lies
    in the bucket itself (top 16 bits ``b``: the first value whose code moves, or the infinity of
    the bucket of inf) or, where it does not, both codes are equal and the compare cannot matter
    (its low bits are then 0). So, with ``bits`` the float32 bits of ``y`` and ``w`` its word::

        threshold = float32 of (bits & 0xFFFF0000) | (w & 0xFFFF)
        nearest_code(y) == ((w >> 24) if y >= threshold else (w >> 16)) & 0xFF

    The compare is the same float32 ``>=`` as ``requant_table``'s (false for NaN, -0.0 == 0.0).
    Returns int32 (65536,) on the CPU, cached per map as ``requant_table``.
    """
    return _packed_of(code)


@functools.lru_cache(maxsize=16)
def _packed_of(code: torch.Tensor) -> torch.Tensor:
    with unset_fake_temporarily():  # a constant, real in a planning trace too
        threshold, codes = requant_table(code)
        low, high = codes[:_PREFIXES].to(torch.int64), codes[_PREFIXES:].to(torch.int64)
        bits = threshold.view(torch.int32).to(torch.int64) & _MASK32
        split = low != high
        # holds by construction (a split's threshold is a value of its bucket): checked because
        # the kernel would silently pick wrong codes otherwise
        assert torch.equal((bits >> 16)[split], torch.nonzero(split)[:, 0]), "threshold outside its bucket"
        word = torch.where(split, bits & 0xFFFF, 0) | (low << 16) | (high << 24)
        return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@functools.lru_cache(maxsize=16)
def _requant_table_of(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Keyed by the map tensor itself (the optimizer keeps one pair of constant maps per device),
    # so a step reads no map values back to the host; a new map object is keyed by its values.
    with unset_fake_temporarily():  # code books are real tensors in a planning trace too
        return _requant_table_cached(code.detach().float().cpu().contiguous().numpy().tobytes())


@dataclass
class _Workspace:
    """Chunk buffers of one fast step (allocated per call: no state outlives a step)."""

    m: torch.Tensor  # float32 (chunk,): first moment, then scratch
    v: torch.Tensor  # float32 (chunk,): second moment
    d: torch.Tensor  # float32 (chunk,): denominator / update, then y = x / absmax
    idx: torch.Tensor  # int32 (chunk,): table indices
    ge: torch.Tensor  # bool (chunk,): y >= threshold
    scale: torch.Tensor  # float32 (chunk / 256,): absmax with zeros replaced by one
    one: torch.Tensor  # float32 0-dim 1.0
    root: torch.Tensor  # float64 (chunk,): v for the correctly rounded square root
    p32: torch.Tensor | None  # float32 (chunk,) when p is not float32
    g32: torch.Tensor | None  # float32 (chunk,) when g is not float32

    @classmethod
    def make(cls, size: int, p_dtype, g_dtype) -> "_Workspace":
        f32 = lambda: torch.empty(size, dtype=torch.float32)  # noqa: E731
        return cls(f32(), f32(), f32(), torch.empty(size, dtype=torch.int32),
                   torch.empty(size, dtype=torch.bool), torch.empty(size // BLOCK), torch.ones(()),
                   torch.empty(size, dtype=torch.float64),
                   None if p_dtype == torch.float32 else f32(),
                   None if g_dtype == torch.float32 else f32())


def _dequantize_into(out, codes, absmax, code, idx) -> None:
    """out (k,) float32 = code[codes] * absmax per block, k a multiple of 256; idx is scratch."""
    idx.copy_(codes)  # uint8 -> int32: index_select takes int32 indices
    torch.index_select(code, 0, idx, out=out)
    out.view(-1, BLOCK).mul_(absmax[:, None])


def _requantize_from(x, codes, absmax, table, w: _Workspace, k: int) -> None:
    """Quantize x (k,) float32 into codes (k,) and absmax (k/256,); x is overwritten."""
    threshold, table_codes = table
    y, idx, ge, scale = w.d[:k], w.idx[:k], w.ge[:k], w.scale[:k // BLOCK]
    blocks = x.view(-1, BLOCK)
    torch.amax(torch.abs(blocks, out=y.view(-1, BLOCK)), dim=1, out=absmax)
    # An all-zero block divides by one and stores exact zeros (as quantize_blockwise).
    torch.where(absmax > 0, absmax, w.one, out=scale)  # NaN > 0 fails too, as there
    torch.div(blocks, scale[:, None], out=y.view(-1, BLOCK))
    idx.copy_(y.view(torch.uint16)[_HIGH_HALF::2])  # the top 16 bits of each float32, 0..65535
    torch.index_select(threshold, 0, idx, out=x)  # x is free now: it holds the thresholds
    torch.ge(y, x, out=ge)
    idx.add_(ge, alpha=_PREFIXES)
    torch.index_select(table_codes, 0, idx, out=codes)


def _step_chunk(p, g, states, maps, tables, s: StepScalars, w: _Workspace, offset, stochastic):
    """The fast step on one chunk of k elements (k a multiple of 256), every buffer in place."""
    m_codes, m_absmax, v_codes, v_absmax = states
    k = p.numel()
    m, v, d = w.m[:k], w.v[:k], w.d[:k]
    _dequantize_into(m, m_codes, m_absmax, maps[0], w.idx[:k])
    _dequantize_into(v, v_codes, v_absmax, maps[1], w.idx[:k])
    g32 = g if w.g32 is None else w.g32[:k].copy_(g)
    # Each line is the reference's expression, in its order, one float32 rounding per op.
    m.mul_(s.beta1).add_(torch.mul(g32, s.one_minus_beta1, out=d))
    v.mul_(s.beta2).add_(torch.mul(g32, g32, out=d).mul_(s.one_minus_beta2))
    p32 = p if w.p32 is None else w.p32[:k].copy_(p)
    p32.mul_(s.decay)
    # the correctly rounded float32 sqrt (through float64, as adamw_math), times 1/sqrt(bc2)
    d.copy_(w.root[:k].copy_(v).sqrt_()).mul_(s.inv_bc2_sqrt).add_(s.eps)
    p32.sub_(torch.div(m, d, out=d).mul_(s.step_size))
    if w.p32 is not None:
        p.copy_(round_to_param(p32, p.dtype, s.seed, offset, stochastic))
    _requantize_from(m, m_codes, m_absmax, tables[0], w, k)
    _requantize_from(v, v_codes, v_absmax, tables[1], w, k)


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="minift-cpu")


def run_split(run, n: int, chunk: int, thread_chunk: int, align: int) -> None:
    """Call ``run(start, stop, chunk_size)`` over [0, n): at once when torch has one thread or the
    work fits one thread chunk, else on ``torch.get_num_threads()`` Python threads, each given a
    contiguous range (a multiple of ``align`` elements) and chunks of at most ``thread_chunk``."""
    small = min(chunk, thread_chunk)
    workers = min(torch.get_num_threads(), -(-n // small))
    # grad mode and dispatch modes (a planning trace's fake tensors) are thread-local: threads
    # run under the caller's grad mode, and never under a dispatch mode
    if workers <= 1 or _get_current_dispatch_mode() is not None:
        return run(0, n, chunk)
    grad = torch.is_grad_enabled()

    def part(a, b):
        with torch.set_grad_enabled(grad):
            run(a, b, small)

    units = n // align
    cuts = [units * i // workers * align for i in range(workers)] + [n]
    futures = [_pool(workers).submit(part, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    for f in futures:
        f.result()


def finite_flags(grads) -> torch.Tensor:
    """bool (len(grads),): whether each CPU tensor is free of NaN and Inf, not read to the host.

    Each tensor's min and max (NaN when it holds a NaN) in chunks as the step's: torch's
    max-norm, the usual test, is not vectorized on CPU (~4 ns per element, measured on an EPYC
    with AVX2 and AVX-512 kernels, against ~0.15 for ``aminmax``).
    """
    flags = []
    for g in grads:
        flat, parts = g.reshape(-1), []

        def run(start, stop, chunk, flat=flat, parts=parts):
            parts.extend(torch.stack(torch.aminmax(flat[a:min(a + chunk, stop)]))
                         for a in range(start, stop, chunk))

        run_split(run, flat.numel(), CHUNK, THREAD_CHUNK, 1)
        flags.append(torch.isfinite(torch.stack(parts)).all())
    return torch.stack(flags)


def adamw8bit_step_cpu(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v,
                       s: StepScalars, offset: int = 0, stochastic: bool = False) -> None:
    """``adamw8bit_step_reference`` with the same arguments and the same bits, faster on CPU.

    Tensors on other devices go to the reference. The last partial block (n % 256 elements)
    also runs the reference: its cost is a few hundred elements.
    """
    if p.device.type != "cpu":
        return adamw8bit_step_reference(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v,
                                        s, offset, stochastic)
    n = p.numel()
    full = n - n % BLOCK
    tables = (requant_table(map_m), requant_table(map_v))

    def run(start, stop, chunk):  # the chunks of [start, stop), one workspace
        w = _Workspace.make(min(chunk, stop - start), p.dtype, g.dtype)
        for a in range(start, stop, chunk):
            b = min(a + chunk, stop)
            blk = slice(a // BLOCK, b // BLOCK)
            _step_chunk(p[a:b], g[a:b], (m_codes[a:b], m_absmax[blk], v_codes[a:b], v_absmax[blk]),
                        (map_m, map_v), tables, s, w, offset + a, stochastic)

    if full:
        run_split(run, full, CHUNK, THREAD_CHUNK, BLOCK)
    if full < n:
        blk = slice(full // BLOCK, None)
        adamw8bit_step_reference(p[full:], g[full:], m_codes[full:], m_absmax[blk],
                                 v_codes[full:], v_absmax[blk], map_m, map_v, s, offset + full,
                                 stochastic)
