"""Code books shared by the 4-bit weights (NF4) and the 8-bit optimizer states.

Both are lookup tables of float32 values; a quantized element stores the index of the nearest
entry. The tables are rebuilt here from their definitions and are bit-for-bit equal to the ones
bitsandbytes uses (tests/test_quantmaps.py checks that), so packed bytes interoperate.
"""
from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

# NormalFloat4 (QLoRA paper, appendix E): quantiles of N(0, 1) rescaled to [-1, 1], with an exact
# zero. 7 negative levels, zero, 8 positive levels. Index 7 is 0.0, index 15 is 1.0.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 levels as float32, shape (16,). A real tensor even in a planning trace (under a
    fake mode, ``minift.tracing``): code books are constants, and caches built from them must not
    hold fake tensors."""
    with unset_fake_temporarily():
        return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Dynamic tree quantization ("8-bit Approximations for Parallelism in Deep Learning";
    # "8-bit Optimizers via Block-wise Quantization", section 2): with 7 exponent levels, level e
    # spreads linear fraction values over [0.1, 1] * 10**(e - 6). The unsigned map spends the sign
    # bit on twice as many fraction values. Arithmetic is float32 as in the reference tables.
    exponent_levels, non_sign_bits = 7, 7
    values: list[float] = []
    for e in range(exponent_levels):
        n_fraction = 2 ** (e + non_sign_bits - exponent_levels + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10 ** (e - (exponent_levels - 1))) * mids
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # the signed map has 254 + 2 entries; pad with zeros
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """The 256-entry dynamic map (signed for values in [-1, 1], unsigned for [0, 1]), float32."""
    with unset_fake_temporarily():  # a constant, real in a planning trace too (as nf4_code)
        # not blocking: a blocking copy to a GPU waits for all queued work (an 8-bit optimizer
        # asks for its maps in its first step); the cached host map outlives the copy
        return _dynamic_map_cpu(bool(signed)).to(device, non_blocking=True)
