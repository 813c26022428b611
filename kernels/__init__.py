"""Triton kernels and their launchers (installed as ``minift.kernels``).

Only ``@triton.jit`` kernels and the plain functions that launch them live here: no autograd
Functions and no nn.Modules. Every kernel has a pure-torch reference in ``minift``.
"""
try:  # triton is absent on some platforms; callers fall back to the torch reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False
