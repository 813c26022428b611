"""Shared test helpers: calls into the oracle libraries, with the workarounds their CPU builds
need, and NF4 weights in format variants bitsandbytes reads but does not write itself."""
import copy

import pytest
import torch

from minift.nf4.quantize import double_quantize, quantize_nf4


def bnb_dequantize(packed, state):
    """bitsandbytes' ``dequantize_4bit`` of ``packed``, read over the flat storage and reshaped.

    bitsandbytes' NF4 format is defined on the flattened tensor: block k covers elements
    [k * blocksize, (k + 1) * blocksize) of ``w.flatten()``. Its native CPU kernel (registered
    only on AVX-512 machines, bitsandbytes 0.50) walks the output row by row and picks the wrong
    absmax when ``shape[-1]`` is not a multiple of the blocksize: on a (64, 96) weight it was off
    by 0.04 where the true round-trip error is 0.009. Asking bitsandbytes for the flat tensor
    gives its own generic result on every CPU, which is the answer its format defines.
    """
    bf = pytest.importorskip("bitsandbytes.functional")
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bf.dequantize_4bit(packed, flat, quant_type="nf4").reshape(state.shape)


def nf4_with_nested_blocksize(w, blocksize, nested_blocksize):
    """Quantize ``w`` to double-quantized NF4 with ``nested_blocksize`` absmax codes per nested scale.

    bitsandbytes always writes 256, but its quant state records the value (``nested_blocksize``)
    and its loader honours it, so a checkpoint may carry another one.
    """
    return double_quantize(quantize_nf4(w, blocksize, double_quant=False), nested_blocksize)
