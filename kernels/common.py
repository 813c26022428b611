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
def to_bf16(x, HARDWARE: tl.constexpr):
    """float32 -> the nearest bfloat16 (ties to even), as a bfloat16 tensor.

    ``HARDWARE`` (launchers pass ``compiled(kernel)``) takes the GPU's conversion: one
    ``cvt.rn.bf16x2.f32`` per two values. Otherwise the bits are rounded as in ``round_to_bf16``
    (five integer instructions a value) and the top half reinterpreted, for Triton's interpreter,
    whose ``.to(tl.bfloat16)`` truncates (and mangles subnormals).

    Both give the same bits for every finite float32. ``cvt.rn`` is IEEE round-to-nearest-even,
    and adding ``0x7FFF + lsb`` to the bits and keeping the top half is exactly that on the
    sign-magnitude encoding: below the halfway point the carry does not reach bit 16, above it it
    always does, at the halfway point only when bit 16 (the lsb kept) is 1. A carry out of the
    mantissa steps the exponent, the right result at the top of a binade; past the largest finite
    bf16 it gives the bits of infinity, where round-to-nearest-even overflows as well. bf16 keeps
    float32's exponent field, so subnormals round by the same rule, and ``cvt`` without ``.ftz``
    does not flush them. Only NaN payloads could differ; no caller rounds a NaN.
    tests/test_kernels_common.py checks ties, the carries, overflow and subnormals against torch
    (the hardware side on a CUDA machine).
    """
    if HARDWARE:
        y = x.to(tl.bfloat16)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def round_bf16(x, HARDWARE: tl.constexpr):
    """float32 -> the nearest bfloat16, returned as float32 (``x.to(bf16).to(float32)`` in torch):
    the hardware conversion and back when ``HARDWARE``, else ``round_to_bf16``; same bits (see
    ``to_bf16``)."""
    if HARDWARE:
        y = x.to(tl.bfloat16).to(tl.float32)
    else:
        y = round_to_bf16(x)
    return y


@triton.jit
def program_offsets(BLOCK: tl.constexpr):
    """(program index, element offsets (BLOCK,)) of this program's block, both int64.

    ``program_id`` is int32 and ``pid * BLOCK`` in int32 wraps once a tensor passes 2**31
    elements (a 8192 x 262144 optimizer slice, or an embedding of a large vocabulary), so the
    product is formed in int64.
    """
    pid = tl.program_id(0).to(tl.int64)
    return pid, pid * BLOCK + tl.arange(0, BLOCK)


def compiled(kernel) -> bool:
    """Whether ``kernel`` runs compiled for a GPU (True) or in Triton's interpreter (False).

    Triton decides when it decorates a kernel (``TRITON_INTERPRET``); launchers pass this as the
    ``HARDWARE`` switch of ``to_bf16`` / ``round_bf16``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(kernel, InterpretedFunction)


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
