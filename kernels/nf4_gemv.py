"""Triton kernel: y = x @ dequant(W).T for a few rows of x (decoding), W never written out in full.

x is (M, K) with M <= 16 (one token per sequence of a small batch), W an NF4 (N, K) weight with
optional double quantization. A program owns ``BLOCK_N`` output columns and a ``K_SPLIT`` slice
of K; it walks its slice in tiles of ``BLOCK_K``: one 16-byte load of packed nibbles a thread,
both nibbles looked up in the 16 NF4 levels, each absmax block's scale decoded once, the tile
rounded to x's dtype and multiplied on the tensor cores (x padded to 16 rows, fp32 accumulator).
The dequantized tile lives in registers only, so the traffic is the packed weight (0.5 byte a
value plus the scales) and x, against 2.5 bytes a value for dequantize-then-matmul in bf16
(0.5 read, 2 written and read again).

When N alone gives too few programs for the GPU (k/v projections, N = 1024), K is split too:
each split writes fp32 partial sums to a (splits, M, N) workspace, added up by the launcher (no
atomics: the result does not depend on the order programs finish in). The pure-torch reference
is ``minift.nf4.quantize.dequantize_nf4`` followed by ``torch.nn.functional.linear``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from minift.kernels.common import compiled, device_guard, launch, to_bf16
from minift.kernels.nf4 import _block_scales

MAX_M = 16  # rows of x a launch takes: tl.dot wants 16 rows; decoding batches up to 16 fill them
_BLOCK_N = 32  # output columns per program
_BLOCK_K = 256  # K per tile: 32 x 128 packed bytes, 16 a thread for 4 warps
_WARPS = 4
_STAGES = 3  # tiles in flight per program (software pipelining of the packed loads)
_TARGET_PROGRAMS = 264  # two programs per multiprocessor of a 132-SM H100 / H200


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                     out_ptr, offset, M, N, K, K_BYTES, K_SPLIT, BLOCKSIZE: tl.constexpr,
                     NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, X_BF16: tl.constexpr,
                     X_FP32: tl.constexpr, COMPILED: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
    row_ok = rows < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * K_SPLIT
    for kk in range(0, K_SPLIT, BLOCK_K):
        k0 = k_begin + kk
        # byte columns of this tile; runs of 16 aligned bytes, so the loads go 16 bytes at a time
        kb = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, BLOCK_K // 2), 16), 16)
        tile_ok = row_ok[:, None] & (kb < K_BYTES)[None, :]
        byte = tl.load(packed_ptr + rows[:, None] * K_BYTES + kb[None, :], mask=tile_ok, other=0)
        byte = byte.to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))  # (BLOCK_N, BLOCK_K / 2): element 2j of the tile
        lo = tl.load(code_ptr + (byte & 15))  # element 2j + 1
        first = rows * K + k0  # flat index of the tile's first element in each row
        if BLOCKSIZE >= BLOCK_K:  # the tile sits inside one block per row (K % BLOCKSIZE == 0)
            scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, first // BLOCKSIZE,
                                  row_ok & (rows * 0 + k0 < K), offset, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            hi = hi * scale[:, None]
            lo = lo * scale[:, None]
        else:  # NB blocks per row of the tile: (BLOCK_N, NB) scales over (BLOCKSIZE / 2)-byte runs
            NB: tl.constexpr = BLOCK_K // BLOCKSIZE
            blk = first[:, None] // BLOCKSIZE + tl.arange(0, NB)[None, :]
            blk_ok = row_ok[:, None] & ((k0 + tl.arange(0, NB) * BLOCKSIZE) < K)[None, :]
            scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, blk, blk_ok, offset,
                                  NESTED_BLOCKSIZE, DOUBLE_QUANT)
            hi = tl.reshape(tl.reshape(hi, (BLOCK_N, NB, BLOCKSIZE // 2)) * scale[:, :, None],
                            (BLOCK_N, BLOCK_K // 2))
            lo = tl.reshape(tl.reshape(lo, (BLOCK_N, NB, BLOCKSIZE // 2)) * scale[:, :, None],
                            (BLOCK_N, BLOCK_K // 2))
        w = tl.interleave(hi, lo)  # (BLOCK_N, BLOCK_K) in memory order, float32
        if X_BF16:  # rounded once to x's dtype, as dequantize_nf4(W, x.dtype) does
            w = to_bf16(w, COMPILED)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        xk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + xk[None, :], mask=m_ok[:, None] & (xk < K)[None, :], other=0.0)
        if X_FP32:  # exact float32 products and sums on the CUDA cores (a float32 tl.dot would
            # round to TF32 or, exact, spill); the tile is sized to stay in registers
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        elif COMPILED:  # bf16 / fp16 on the tensor cores, float32 accumulator
            acc += tl.dot(x, tl.trans(w))
        else:  # the interpreter's dot mishandles 16-bit floats; their products are exact in float32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    out = out_ptr + split.to(tl.int64) * M * N + m[:, None] * N + rows[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & row_ok[None, :])


def tile_sizes(m: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of a launch. bf16 / fp16 pad x to the 16 rows of a tensor-core tile;
    float32 takes the next power of two of M and shrinks K so that the (BLOCK_M, BLOCK_N,
    BLOCK_K) products come to 64 values a thread."""
    if dtype != torch.float32:
        return MAX_M, _BLOCK_K
    block_m = triton.next_power_of_2(m)
    return block_m, max(32, min(_BLOCK_K, 64 * 32 * _WARPS // (block_m * _BLOCK_N)))


def gemv_splits(n: int, k: int, block_k: int = _BLOCK_K) -> int:
    """How many slices of K a launch cuts (N, K) into: enough programs to reach about two per
    multiprocessor of an H100, each slice at least one ``block_k`` tile."""
    tiles = triton.cdiv(n, _BLOCK_N)
    return max(1, min(_TARGET_PROGRAMS // tiles, triton.cdiv(k, block_k)))


def supported(x: torch.Tensor, shape, blocksize: int) -> bool:
    """Whether ``nf4_gemv`` takes this input: M <= 16 rows, a float x, and blocks that do not
    straddle rows of W (K a multiple of the block size; every Llama linear is)."""
    k = int(shape[-1])
    m = x.numel() // k if k else 0
    return (len(shape) == 2 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and 0 < m <= MAX_M and k % blocksize == 0 and k % 2 == 0)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape,
             blocksize: int, *, nested_absmax=None, nested_code=None, offset=None,
             nested_blocksize: int = 256, splits: int | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` for x (..., K) with at most 16 rows; returns (..., N) in x's dtype.

    Args:
        x: float32 / bfloat16 / float16, last dimension K, ``x.numel() // K <= 16``.
        packed, absmax, code, shape, blocksize: the NF4 weight of ``shape`` (N, K) (see
            ``minift.nf4.format.NF4Weight``); K must be a multiple of ``blocksize``.
        nested_absmax, nested_code, offset, nested_blocksize: the double quantization, or None.
        splits: slices of K (default ``gemv_splits(N, K)``).
    """
    n, k = (int(s) for s in shape)
    if not supported(x, shape, blocksize) or x.shape[-1] != k:
        raise ValueError(f"nf4_gemv: x {tuple(x.shape)} {x.dtype} with weight {tuple(shape)} blocksize "
                         f"{blocksize}: needs a float x of last dimension {k}, at most {MAX_M} rows, "
                         "and K a multiple of the blocksize")
    if packed.numel() != n * k // 2:
        raise ValueError(f"nf4_gemv: {packed.numel()} packed bytes do not fit shape {(n, k)}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    block_m, block_k = tile_sizes(m, x.dtype)
    splits = gemv_splits(n, k, block_k) if splits is None else splits
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    work = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    double_quant = nested_absmax is not None
    with device_guard(x.device):
        launch(_nf4_gemv_kernel, (triton.cdiv(n, _BLOCK_N), splits))(
            x2, packed.reshape(-1), absmax, nested_absmax if double_quant else absmax,
            nested_code if double_quant else code, code, work, float(offset) if double_quant else 0.0,
            m, n, k, k // 2, k_split, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
            DOUBLE_QUANT=double_quant, X_BF16=x.dtype == torch.bfloat16, X_FP32=x.dtype == torch.float32,
            COMPILED=compiled(_nf4_gemv_kernel), BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
            num_warps=_WARPS, num_stages=_STAGES,
            # scales as the reference forms them (product, then sum); float32 products unfused
            enable_fp_fusion=False,
        )
    y = work[0] if splits == 1 else work.sum(0)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
