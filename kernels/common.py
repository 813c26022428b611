"""Pieces every kernel in minift.kernels shares: bf16 rounding, 64-bit offsets, the device guard."""
import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), returned as float32 with the low half zero.

    Done on the bits because Triton's interpreter truncates in ``.to(tl.bfloat16)`` while GPUs and
    torch round to nearest; with the low 16 bits cleared the caller's final cast is exact on every
    backend, so interpreter, GPU and torch agree bit for bit. Inputs are finite (no NaN handling).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def program_offsets(BLOCK: tl.constexpr):
    """(program index, element offsets (BLOCK,)) of this program's block, both int64.

    ``program_id`` is int32 and ``pid * BLOCK`` in int32 wraps once a tensor passes 2**31
    elements (a 8192 x 262144 optimizer slice, or an embedding of a large vocabulary), so the
    product is formed in int64.
    """
    pid = tl.program_id(0).to(tl.int64)
    return pid, pid * BLOCK + tl.arange(0, BLOCK)


def device_guard(device: torch.device):
    """Context that makes ``device`` torch's current CUDA device during a launch.

    Triton launches on the current device, so a tensor on cuda:1 while cuda:0 is current would
    get a kernel on GPU 0 reading GPU-1 pointers. Nothing to do for CPU tensors (interpreter).
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid):
    """``kernel[grid]``, except that a call with fake tensors (a planning trace of the CUDA path,
    ``minift.tracing``) launches nothing: the launcher has already allocated its outputs and
    scratch exactly as for a real launch, which is all a trace measures."""
    def run(*args, **kwargs):
        if any(_is_fake(a) for a in args):
            return None
        return kernel[grid](*args, **kwargs)
    return run


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)
