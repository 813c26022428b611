"""Every Triton kernel compiles for sm_80 and sm_90 without register spills (no GPU needed).

tests/kernel_compile.py does the work in a subprocess: Triton's interpreter, which the other
kernel tests run under, is switched on in this process and does not compile.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("kernel_compile.py")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_kernel_is_compiled_for_both_archs(report):
    compiled = {(r["entry"], r["arch"]) for r in report["records"]}
    assert report["kernels"], "no kernel found in minift.kernels"
    for entry in report["kernels"]:
        assert {(entry, "sm_80"), (entry, "sm_90")} <= compiled, entry


def test_no_register_spills(report):
    spilled = [(r["entry"], r["case"], r["arch"]) for r in report["records"]
               if r["spill_stores"] or r["spill_loads"]]
    assert not spilled
    assert all(0 < r["registers"] <= 255 for r in report["records"])


def test_no_kernel_uses_fused_multiply_add(report):
    # the 8-bit AdamW step and NF4 dequantization must equal their torch references bit for bit
    # (torch rounds every product and sum); the others then compute as the interpreter does
    assert {r["kernel"] for r in report["records"]} >= {"adamw8bit", "nf4_dequant"}
    assert all(not r["fp_fusion"] and r["fma_f32"] == 0 for r in report["records"])


def test_adamw_offsets_go_64_bit_past_two_to_the_31(report):
    sizes = {r["case"].split()[0]: r["int_args"]["n"] for r in report["records"]
             if r["kernel"] == "adamw8bit"}
    assert sizes[str(8192 * 28672)] == "i32" and sizes[str(2**31 + 256)] == "i64"


def test_nf4_packed_bytes_are_not_loaded_one_by_one(report):
    # with the byte count passed as an argument the packed bytes come in as wide loads; the one
    # byte load left is the per-block absmax code of double quantization
    for r in report["records"]:
        if r["kernel"] == "nf4_dequant":
            assert r["ld_global_u8"] <= (1 if "double-quant" in r["case"] else 0), r


def test_adamw_requantizes_without_a_search(report):
    # 94 global loads per program with the 8-step binary search over the map (80 of them the
    # search's); the packed table needs one gather per value: the loads left are the block's
    # gradient, parameter and codes, two map gathers, two absmax and two table gathers per
    # element a thread holds, plus the multi-tensor launch's table row
    cases = [r for r in report["records"] if r["kernel"] in ("adamw8bit", "adamw8bit_multi")]
    assert {r["kernel"] for r in cases} == {"adamw8bit", "adamw8bit_multi"}
    for r in cases:
        if "unaligned" not in r["case"]:
            assert r["ld_global"] <= 40 and r["ld_global_u8"] == 0, r  # codes come 4 bytes at a time
        else:  # element counts not a multiple of 16: masked loads element by element
            assert r["ld_global_u8"] > 0, r


def test_a_lora_step_of_448_parameters_is_one_launch(report):
    lora = [r for r in report["records"] if r["kernel"] == "adamw8bit_multi" and "LoRA" in r["case"]]
    assert lora and all(r["launch"] == 0 for r in lora)  # no second launch recorded for any case
    h, kv, inter, r = 4096, 1024, 14336, 16  # Llama-3.1-8B, rank 16
    per_layer = (6 * h + inter) * r + (h + kv + kv + h + inter + inter + h) * r  # A factors, B factors
    blocks = 32 * per_layer // 256  # every factor a whole number of 256-element blocks
    assert all(r["grid"] == [blocks] for r in lora)
