"""Launch sizes of the RMSNorm backward, in plain Python (no Triton needed).

``minift.models.fused``'s fake implementation of the backward op allocates the float32 partial
dw buffer the launcher allocates, one row per program, so planning traces on machines without
Triton count it as a GPU run would; both read the program count from here.
"""
from typing import NamedTuple

H100_SMS = 132  # multiprocessors of an H100 SXM and an H200: what planning traces assume


class BackwardSizes(NamedTuple):
    block: int     # BLOCK_N: the row, rounded up to a power of two
    rows: int      # ROWS: rows per tile
    warps: int
    prefetch: bool  # load the next tile while reducing this one
    per_sm: int    # programs per multiprocessor in the persistent grid


def backward_sizes(n_cols: int, itemsize: int) -> BackwardSizes:
    """Tile, warps and grid of the backward for rows of ``n_cols`` elements of ``itemsize`` bytes.

    * A tile is one row, or up to 4 short rows so that it holds at least 8 KiB of each of dy and x.
    * Warps give each thread 16 bytes of each of dy and x per tile (one 128-bit load), up to 32
      warps (1,024 threads, a program's limit).
    * With a tile of at most 16 KiB the next tile's loads go out before this tile is reduced: the
      program keeps loads in flight while it reduces and stores, at twice the registers for dy
      and x. Past that (bf16 rows of 16384) it would spill: the tile is loaded, then reduced.
    * Two programs per multiprocessor where two fit in the 65,536 registers: up to 8 warps (128
      registers a thread), or 16 warps on one-row tiles (which take under 64; a tile of several
      rows carries a statistic and a mask per row and takes about 80), else one. Each program
      adds a float32 row of partial dw sums to write and read back, so the grid stays persistent
      (tests/test_kernels_compile.py checks that it fits in one wave at the compiled sizes).
    """
    block = 1 << max(n_cols - 1, 0).bit_length()
    row_bytes = block * itemsize
    rows = max(1, min(4, 8192 // row_bytes))
    tile_bytes = rows * row_bytes
    warps = max(1, min(32, tile_bytes // 512))
    prefetch = tile_bytes <= 16384
    per_sm = 2 if warps <= 8 or (warps == 16 and rows == 1) else 1
    return BackwardSizes(block, rows, warps, prefetch, per_sm)


def backward_programs(n_rows: int, n_cols: int, itemsize: int, sms: int = H100_SMS) -> int:
    """Programs of the backward's persistent grid on a GPU of ``sms`` multiprocessors."""
    return max(1, min(backward_sizes(n_cols, itemsize).per_sm * sms, n_rows))
