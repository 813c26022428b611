"""Shared test helpers: calls into the oracle libraries, with the workarounds their CPU builds
need, and NF4 weights in format variants bitsandbytes reads but does not write itself."""
import copy
from dataclasses import replace

import pytest
import torch


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
    and its loader honours it, so a checkpoint may carry another one. Built from minift's own
    pieces: the fp32 absmaxes minus their mean, 8-bit quantized in blocks of ``nested_blocksize``.
    """
    from minift.nf4 import _quantize_8bit, quantize_nf4
    from minift.quantmaps import dynamic_map

    single = quantize_nf4(w, blocksize, double_quant=False)
    offset = single.absmax.mean()
    codes, nested_absmax = _quantize_8bit(single.absmax - offset, nested_blocksize)
    return replace(single, absmax=codes, nested_absmax=nested_absmax, nested_code=dynamic_map(True, w.device),
                   offset=float(offset), nested_blocksize=nested_blocksize)
