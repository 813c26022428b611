"""The fused NF4 GEMV kernel (interpreted on CPU) against dequantize-then-matmul, and its sm_90
compile (registers, no spills) through tests/kernel_compile.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minift.nf4.quantize import _dequantize_reference, quantize_nf4

pytestmark = pytest.mark.triton

CASES = [  # rows of x, (N, K), blocksize, double quantization, x dtype, K slices
    (1, (40, 512), 64, True, torch.float32, None),
    (3, (33, 256), 256, False, torch.bfloat16, 1),  # one scale per row and tile
    (16, (64, 1024), 512, True, torch.float16, 3),  # a last slice past K
    (5, (32, 768), 32, True, torch.bfloat16, 2),  # 8 blocks per row and tile
    (2, (300, 4096), 64, True, torch.float32, None),  # > 256 absmax blocks: several nested scales
]


def reference(x, q):
    """dequantize_nf4(W, x.dtype), then the matmul in float32, rounded once to x's dtype."""
    w = _dequantize_reference(q, x.dtype).float()
    return torch.nn.functional.linear(x.float(), w).to(x.dtype)


@pytest.mark.parametrize("m,shape,blocksize,dq,dtype,splits", CASES)
def test_gemv_equals_dequantize_then_matmul(m, shape, blocksize, dq, dtype, splits, kernel_device):
    from minift.kernels.nf4_gemv import nf4_gemv

    g = torch.Generator().manual_seed(m)
    q = quantize_nf4(torch.randn(shape, generator=g), blocksize, dq)
    x = torch.randn(m, shape[1], generator=g).to(dtype)
    qd = q.to(kernel_device)
    y = nf4_gemv(x.to(kernel_device), qd.packed, qd.absmax, qd.code, q.shape, blocksize,
                 nested_absmax=qd.nested_absmax, nested_code=qd.nested_code, offset=q.offset,
                 nested_blocksize=q.nested_blocksize, splits=splits).cpu()
    want = reference(x, q)
    assert y.shape == (m, shape[0]) and y.dtype == dtype
    # the same products summed in another order: within a rounding of the output dtype, plus the
    # float32 error of the sum (relative to the size of the terms)
    scale = (x.float().abs() @ _dequantize_reference(q, torch.float32).abs().T).max()
    tol = torch.finfo(dtype).eps * want.float().abs() + 1e-5 * scale
    assert ((y.float() - want.float()).abs() <= tol).all()


def test_gemv_refuses_what_it_does_not_take():
    from minift.kernels.nf4_gemv import nf4_gemv

    q = quantize_nf4(torch.randn(8, 96), 64)  # K = 96 is no multiple of the blocksize
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        nf4_gemv(torch.randn(1, 96), q.packed, q.absmax, q.code, q.shape, 64)
    q = quantize_nf4(torch.randn(8, 128), 64)
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_gemv(torch.randn(17, 128), q.packed, q.absmax, q.code, q.shape, 64)


@pytest.mark.slow
def test_gemv_compiles_for_sm_90_without_spills():
    script = Path(__file__).with_name("kernel_compile.py")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, str(script), "--kernel", "nf4_gemv", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads(out.stdout)["records"]
    assert {r["case"].split(" @ ")[1] for r in records} == {
        f"nf4 {n}x{k} blocksize 64 double-quant" for n, k in ((4096, 4096), (1024, 4096), (14336, 4096),
                                                               (4096, 14336))}
    for r in records:
        assert r["arch"] == "sm_90" and 0 < r["registers"] <= 128, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["fma_f32"] == 0, r
        assert r["programs_per_sm"] >= 2, r
