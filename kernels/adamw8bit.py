"""Fused AdamW step on blockwise 8-bit states: one pass over memory, one launch per step.

Each program owns one 256-element block, the unit of the absmax scale, so the new absmax is a
reduction inside the program and the whole step is a single pass over memory: read grad, param,
two uint8 codes and two absmax; write param, two codes and two absmax. The pure-torch reference
(same op order, same float32 roundings) is ``minift.optim.quant8.adamw8bit_step_reference``.

Two launchers share the block step ``_step_block``:

* ``adamw8bit_step``: one flat parameter slice, pointers as kernel arguments (the optimizer uses
  it when one parameter steps alone: a hook of the step in backward, a streamed page);
* ``adamw8bit_step_many``: many slices in one launch per group of like slices (same dtypes and
  step scalars). Per slice an int64 row (pointers, element count, offset, seed) and its first
  program go into one device table; a program finds its slice by a binary search over the
  first programs and casts the row's integers to pointers. A LoRA step of 448 parameters is one
  launch instead of 448.

Requantizing is one gather per value: ``minift.optim.quant8.packed_requant_table`` packs the
CPU step's table (threshold and both candidate codes of each top-16-bit bucket of ``x/absmax``)
into one int32 word, so the nearest map entry is a gather, a compare and a select (the binary
search over the 256-entry map it replaces made 80 of the kernel's 94 PTX global loads).

Bitwise agreement with the reference rests on three choices: the launch has FP fusion off (a
fused multiply-add rounds once where torch's separate kernels round twice); the bias correction
of the second moment is a multiplication by a host-computed reciprocal, never a division by a
scalar (torch's CUDA division by a Python scalar multiplies by its reciprocal, the CPU divides,
so only the multiplication is the same everywhere); bf16 rounding is done on the bits.
"""
import functools
import math

import torch
import triton
import triton.language as tl
from minift.kernels.common import _is_fake, device_guard, launch, program_offsets, round_to_bf16

BLOCK = 256  # elements per program = elements per absmax block
# int64 words per slice in a multi-tensor table: pointers to p, g, m codes, m absmax, v codes,
# v absmax, then the element count, the element offset and the seed (plus its first program)
ROW = 9
MAX_PROGRAMS = 2**31 - 1  # grid limit of one launch (CUDA's x dimension)
_LAUNCH_OPTIONS = dict(num_warps=2,  # both launchers
                       # No fused multiply-add: the reference rounds every product and sum on its
                       # own (with fusion on the sm_90 PTX holds fma.rn.f32: tests/kernel_compile.py).
                       enable_fp_fusion=False)


@triton.jit
def _nearest(y, table_ptr):
    """Index of the map entry nearest to y (ties to the lower entry), as ``nearest_code``.

    One gather of the bucket's packed word (top 16 bits of y), one compare with the bucket's
    threshold (rebuilt from y's top and the word's low 16 bits), one select between its codes.
    """
    bits = y.to(tl.uint32, bitcast=True)
    word = tl.load(table_ptr + (bits >> 16)).to(tl.uint32, bitcast=True)
    threshold = ((bits & 0xFFFF0000) | (word & 0xFFFF)).to(tl.float32, bitcast=True)
    return tl.where(y >= threshold, word >> 24, (word >> 16) & 0xFF)


@triton.jit
def _requantize(x, mask, table_ptr, codes_ptr, absmax_ptr, offs, blk):
    """Fresh absmax for this block, then nearest map entry of x / absmax; stores both."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    scale = tl.where(absmax > 0.0, absmax, 1.0)  # all-zero block: store zeros, not NaN
    idx = _nearest(tl.div_rn(x, scale), table_ptr)
    tl.store(codes_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blk, absmax)


@triton.jit
def _stochastic_round_bf16(p, offs, seed):
    """Add 16 hashed bits below the bf16 mantissa and truncate (hash: lowbias32, see quant8)."""
    x = offs.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    bits = p.to(tl.uint32, bitcast=True) + (x & 0xFFFF)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _step_block(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, map_m_ptr, map_v_ptr,
                table_m_ptr, table_v_ptr, n, blk, offs, offset, seed, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt, STOCHASTIC: tl.constexpr,
                IS_BF16: tl.constexpr):
    """The step on block ``blk`` (int64) of one slice; ``offs`` (BLOCK,) int64 its elements."""
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(map_m_ptr + mq) * tl.load(mabs_ptr + blk)  # one absmax block per program
    v = tl.load(map_v_ptr + vq) * tl.load(vabs_ptr + blk)
    # Same operation order as minift.optim.quant8.adamw_math (decoupled decay before the Adam update).
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    p = p * decay
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - tl.div_rn(m, denom) * step_size
    if STOCHASTIC:
        p = _stochastic_round_bf16(p, offs + offset, seed)
    elif IS_BF16:
        p = round_to_bf16(p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _requantize(m, mask, table_m_ptr, mq_ptr, mabs_ptr, offs, blk)
    _requantize(v, mask, table_v_ptr, vq_ptr, vabs_ptr, offs, blk)


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, map_m_ptr, map_v_ptr,
                      table_m_ptr, table_v_ptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      eps, decay, step_size, inv_bc2_sqrt, seed, offset, STOCHASTIC: tl.constexpr,
                      IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid, offs = program_offsets(BLOCK)  # int64, (BLOCK,) int64: slices may pass 2**31 elements
    _step_block(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, map_m_ptr, map_v_ptr, table_m_ptr,
                table_v_ptr, n, pid, offs, offset, seed, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt, STOCHASTIC, IS_BF16)


@triton.jit
def _adamw8bit_multi_kernel(table_ptr, num_tensors, map_m_ptr, map_v_ptr, table_m_ptr, table_v_ptr,
                            beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                            inv_bc2_sqrt, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                            ALIGNED: tl.constexpr, STOCHASTIC: tl.constexpr, IS_BF16: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Many slices: ``table_ptr`` holds int64 [first program of each slice (num_tensors,) |
    rows (num_tensors, ROW)], a row being (p, g, m codes, m absmax, v codes, v absmax pointers,
    element count, element offset, seed)."""
    pid = tl.program_id(0).to(tl.int64)
    # the slice t with first[t] <= pid < first[t + 1]: binary search, first[num_tensors] = grid
    lo = tl.program_id(0) * 0  # int32 0 (a tensor, so the loop may reassign it)
    hi = lo + num_tensors
    while hi - lo > 1:
        mid = (lo + hi) // 2
        below = tl.load(table_ptr + mid) <= pid
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    blk = pid - tl.load(table_ptr + lo)  # block index inside the slice
    row = table_ptr + num_tensors + lo.to(tl.int64) * 9  # ROW words a row
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    mq_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
    mabs_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    vq_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    vabs_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 6)
    offset = tl.load(row + 7)
    seed = tl.load(row + 8)
    if ALIGNED:  # the launcher checked: 16-byte aligned pointers, n a multiple of 16 (wide loads)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        mq_ptr = tl.multiple_of(mq_ptr, 16)
        vq_ptr = tl.multiple_of(vq_ptr, 16)
        n = tl.multiple_of(n, 16)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    _step_block(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, map_m_ptr, map_v_ptr, table_m_ptr,
                table_v_ptr, n, blk, offs, offset, seed, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt, STOCHASTIC, IS_BF16)


@functools.lru_cache(maxsize=16)
def _packed_on(code: torch.Tensor) -> torch.Tensor:
    # Keyed by the map tensor (the optimizer keeps one pair per device, so a step reads nothing
    # back to the host): its packed requantization table on the map's device, 256 KiB, made once
    # per process and map, with every dispatch mode off (a constant like the maps: neither a
    # planning trace nor a MemoryTracker counts it as the step's memory).
    from minift.optim.quant8 import packed_requant_table  # here: minift.optim imports this module
    from minift.tracing import host_read

    with host_read():
        if code.device.type == "meta":  # the compile check (tests/kernel_compile.py): no values
            return torch.empty(2**16, dtype=torch.int32, device="meta")
        return packed_requant_table(code).to(code.device, non_blocking=True)  # once per process and map


def requant_tables(map_m, map_v):
    """The packed requantization tables of the two maps on their device (cached per map)."""
    return _packed_on(map_m), _packed_on(map_v)


def _scalar_args(s):
    return (s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.decay, s.step_size,
            s.inv_bc2_sqrt)


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK  # plain Python: host time matters with hundreds of slices


def _check_launch(p, g, m_codes, m_absmax, v_codes, v_absmax, s, n):
    # Preconditions of a launch, not user errors: minift.optim checks what users pass (on
    # construction, add_param_group and load_state_dict), so these only guard the internal calls.
    assert p.is_contiguous() and p.dim() == 1 and g.numel() == n and g.is_contiguous()
    assert m_codes.numel() == v_codes.numel() == n
    assert m_absmax.numel() == v_absmax.numel() == _blocks(n)
    assert m_codes.dtype == v_codes.dtype == torch.uint8
    assert m_absmax.dtype == v_absmax.dtype == torch.float32
    assert all(math.isfinite(x) for x in _scalar_args(s)), s
    assert 0 <= s.seed < 2**31, s


def adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v, s, offset=0,
                   stochastic=False):
    """Launch the fused step on a flat contiguous parameter slice; updates everything in place.

    ``s`` carries the step scalars (``minift.optim.quant8.StepScalars``); ``offset`` is the element
    offset of the slice in its tensor (multiple of 256) so stochastic rounding matches.
    """
    n = p.numel()
    _check_launch(p, g, m_codes, m_absmax, v_codes, v_absmax, s, n)
    if n == 0:
        return
    grid = (_blocks(n),)
    with device_guard(p.device):
        launch(_adamw8bit_kernel, grid)(
            p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v, *requant_tables(map_m, map_v),
            n, *_scalar_args(s), s.seed, offset,
            STOCHASTIC=bool(stochastic and p.dtype == torch.bfloat16),
            IS_BF16=p.dtype == torch.bfloat16, BLOCK=BLOCK, **_LAUNCH_OPTIONS)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def adamw8bit_step_many(slices, map_m, map_v) -> int:
    """The fused step on many flat slices at once: one launch per group of like slices.

    Args:
        slices: sequence of ``(p, g, m_codes, m_absmax, v_codes, v_absmax, s, offset,
            stochastic)``, each as the arguments of ``adamw8bit_step``, all on one device.
        map_m, map_v: the signed and unsigned maps on that device.

    Slices are grouped by parameter and gradient dtype, effective stochastic rounding, the step
    scalars other than the seed (so a param group's parameters at one step are one group) and
    whether the slice allows 16-byte loads; the seed and the offset are per slice. The rows of
    every slice go into one int64 device table per call, ``ROW + 1`` words a non-empty slice,
    copied in once (from pinned memory on CUDA, without a sync). With fake tensors (a planning
    trace) the table is allocated the same, left unfilled, and nothing is launched. Returns the
    number of launches (in a trace: that a real step makes).
    """
    slices = list(slices)
    if not slices:
        return 0
    device = slices[0][0].device
    fake = _is_fake(slices[0][0])  # a planning trace: no data pointers (all its tensors are fake)
    groups = {}  # key -> [(n, data pointers, offset, seed)], one per non-empty slice
    for sl in slices:
        if len(sl) != 9:
            raise ValueError(f"adamw8bit_step_many: a slice is (p, g, m_codes, m_absmax, v_codes, "
                             f"v_absmax, s, offset, stochastic), got {len(sl)} items")
        p, g, m_codes, m_absmax, v_codes, v_absmax, s, offset, stochastic = sl
        n = p.numel()
        _check_launch(p, g, m_codes, m_absmax, v_codes, v_absmax, s, n)
        if any(t.device != device for t in sl[:6]):
            raise ValueError(f"adamw8bit_step_many: every tensor must be on {device}, got "
                             f"{sorted({str(t.device) for t in sl[:6]})}")
        if p.dtype not in _TL_DTYPES or g.dtype not in _TL_DTYPES:
            raise ValueError(f"adamw8bit_step_many: parameters and gradients must be float32, "
                             f"bfloat16 or float16, got {p.dtype} and {g.dtype}")
        assert offset >= 0, offset
        if n == 0:
            continue
        stochastic = bool(stochastic and p.dtype == torch.bfloat16)
        ptrs = () if fake else tuple(t.data_ptr() for t in sl[:6])
        aligned = n % 16 == 0 and all(x % 16 == 0 for x in ptrs)
        groups.setdefault((p.dtype, g.dtype, stochastic, aligned, _scalar_args(s)), []).append(
            (n, ptrs, offset, s.seed))
    parts = [(key, part) for key, items in groups.items() for part in _split(items)]
    if not parts:
        return 0
    table = torch.empty((ROW + 1) * sum(len(part) for _, part in parts), dtype=torch.int64,
                        device=device)
    words, launches, at = [], [], 0  # per launch: first programs, then rows; at: its start
    for key, part in parts:
        first, rows, programs = [], [], 0
        for n, ptrs, offset, seed in part:
            first.append(programs)
            programs += _blocks(n)
            rows += [*ptrs, n, offset, seed]
        launches.append((key, at, len(part), programs))
        words += first + rows
        at += (ROW + 1) * len(part)
    if not fake:  # in a trace the table is allocated as for a real launch and left unfilled
        _fill(table, words)
    with device_guard(device):
        tables = requant_tables(map_m, map_v)
        for (p_dtype, g_dtype, stochastic, aligned, scalars), at, count, programs in launches:
            launch(_adamw8bit_multi_kernel, (programs,))(  # launches nothing on fake tensors
                table[at:], count, map_m, map_v, *tables, *scalars,
                P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], ALIGNED=aligned,
                STOCHASTIC=stochastic, IS_BF16=p_dtype == torch.bfloat16, BLOCK=BLOCK,
                **_LAUNCH_OPTIONS)
    return len(launches)


def _split(items):
    """``items`` ((n, pointers, offset, seed) of slices) cut into runs of at most MAX_PROGRAMS
    programs (one launch's grid)."""
    part, programs = [], 0
    for item in items:
        blocks = _blocks(item[0])
        assert blocks <= MAX_PROGRAMS, item[0]
        if part and programs + blocks > MAX_PROGRAMS:
            yield part
            part, programs = [], 0
        part.append(item)
        programs += blocks
    if part:
        yield part


def _fill(table, words) -> None:
    """Copy the host integers ``words`` into the device ``table`` without waiting for it."""
    from minift.tracing import host_read

    cuda = table.device.type == "cuda"
    with host_read():  # host bookkeeping, not the step's memory (as a MemoryTracker files it)
        host = torch.tensor(words, dtype=torch.int64)
        # pinned, so the copy does not wait; the caching host allocator keeps the block until
        # the copy has run
        host = host.pin_memory() if cuda else host
    table.copy_(host, non_blocking=cuda)
