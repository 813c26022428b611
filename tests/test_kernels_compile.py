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


def test_nf4_packed_bytes_come_in_16_bytes_per_thread(report):
    # each thread's share of a program's packed bytes is at least 16 and arrives in 128-bit loads
    # (ld.global.v4.b32); the other loads are the level and scale look-ups, 4 bytes or 1 each
    from kernel_compile import width_bytes

    records = [r for r in report["records"] if r["kernel"] == "nf4_dequant"]
    assert records
    for r in records:
        per_thread = r["constexprs"]["BLOCK"] // 2 // (32 * r["num_warps"])
        wide = sum(width_bytes(k) * n for k, n in r["ld_global_widths"].items() if width_bytes(k) >= 16)
        assert per_thread >= 16 and wide >= per_thread, r


def test_bf16_outputs_round_with_the_hardware_conversion(report):
    # kernels with the HW_BF16 switch, compiled: cvt.rn.bf16(x2).f32 and none of round_to_bf16's
    # integer rounding; in rope and swiglu, which still round on the bits, the count does find it
    bf16 = [r for r in report["records"] if any(v is True for k, v in r["constexprs"].items()
                                                 if k.endswith("BF16") and k != "HW_BF16")]
    switched = [r for r in bf16 if "HW_BF16" in r["constexprs"]]
    assert {r["kernel"] for r in switched} >= {"nf4_dequant", "rmsnorm_fwd", "rmsnorm_bwd"}
    for r in switched:
        assert r["constexprs"]["HW_BF16"] is True, r
        assert r["add_0x7fff"] == 0 and r["cvt_bf16_f32"] + r["cvt_bf16x2_f32"] > 0, r
    still_on_bits = [r for r in bf16 if r["kernel"] in ("rope", "swiglu_fwd", "swiglu_bwd")]
    assert still_on_bits and all(r["add_0x7fff"] > 0 for r in still_on_bits)
    nf4 = [r for r in switched if r["kernel"] == "nf4_dequant"]  # two values per conversion
    assert all(2 * r["cvt_bf16x2_f32"] >= r["constexprs"]["BLOCK"] // (32 * r["num_warps"]) for r in nf4)


def test_rmsnorm_compiles_without_spills_at_hidden_16384(report):
    cases = [r for r in report["records"] if r["kernel"] in ("rmsnorm_fwd", "rmsnorm_bwd")
             and r["case"].split()[0].endswith("x16384")]
    assert {(r["kernel"], r["arch"]) for r in cases} == {(k, a) for k in ("rmsnorm_fwd", "rmsnorm_bwd")
                                                         for a in ("sm_80", "sm_90")}
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in cases)


def test_rmsnorm_backward_grid_is_resident_in_one_wave(report):
    # the persistent grid (programs per multiprocessor x 132) must all fit at once, or the second
    # wave would run after the first; its loads are 128-bit at the Llama hidden sizes
    from kernel_compile import SM_LIMITS

    records = [r for r in report["records"] if r["kernel"] == "rmsnorm_bwd"]
    assert records
    for r in records:
        assert r["grid"][0] <= r["programs_per_sm"] * SM_LIMITS[90]["sms"], r
        assert set(r["st_global_widths"]) == {"v4.b32"} and r["ld_global_widths"].get("v4.b32"), r


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


def test_the_roofline_table_in_the_docs_is_the_records():
    import re

    from kernel_roofline import RECORDS, table

    with open(RECORDS, encoding="utf-8") as f:
        want = table(json.load(f)["records"])
    docs = (Path(__file__).resolve().parent.parent / "docs" / "kernels.md").read_text(encoding="utf-8")
    got = re.search(r"<!-- roofline: python tests/kernel_roofline.py -->\n(.*?)<!-- /roofline -->", docs, re.S)
    assert got and got.group(1) == want, "docs/kernels.md: rerun python tests/kernel_roofline.py"
