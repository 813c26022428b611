"""The per-kernel roofline table of docs/kernels.md, from the compile records.

For each Triton kernel at Llama-3.1-8B shapes: the bytes one call must move (every tensor read or
written once), the least time that takes at the HBM bandwidth of an H100 SXM (3.35 TB/s) and an
H200 (4.8 TB/s), and from the sm_90 compile record (docs/benchmarks/kernels_compile_sm90.json,
written by tests/kernel_compile.py) the registers, spills, programs a multiprocessor and the
global loads and stores by width. A GPU figure goes in the last column once a GPU has run
``python -m minift bench gpu``; none has.

    python tests/kernel_roofline.py [RECORDS_JSON]     # prints the markdown table

tests/test_kernels_compile.py checks that docs/kernels.md holds exactly this table.
"""
import json
import os
import sys

HBM = {"H100 SXM": 3.35e12, "H200": 4.8e12}
RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "benchmarks",
                       "kernels_compile_sm90.json")
TOKENS, HIDDEN, INTER, HEADS, KV, HEAD_DIM = 2 * 2048, 4096, 14336, 32, 8, 128
FULL_8B = 8_030_261_248  # parameters of Llama-3.1-8B
LORA_8B_R16 = 41_943_040  # rank-16 LoRA factors on every decoder linear of Llama-3.1-8B
# 8-bit AdamW, bytes an element: parameter read + written, gradient read, two uint8 codes read +
# written, two float32 absmax read + written per 256 elements
ADAM_BF16 = 2 + 2 + 2 + 4 + 16 / 256
ADAM_FP32 = 4 + 4 + 4 + 4 + 16 / 256


def _nf4(rows: int, cols: int) -> float:
    n = rows * cols
    return n / 2 + n / 64 + 4 * n / (64 * 256) + 2 * n  # packed, absmax codes, nested absmax, bf16 out


def _rmsnorm_bwd(record) -> float:
    programs = record["grid"][0]  # each writes one float32 row of partial weight gradients
    return 3 * 2 * TOKENS * HIDDEN + programs * HIDDEN * 4 + 2 * HIDDEN + 4 * TOKENS


def _rope(heads: int) -> float:
    rows = TOKENS * HEAD_DIM
    return 2 * 2 * heads * rows + 2 * 2 * rows  # x read + out written; cos and sin rows read once


# (label, kernel, case, launch index, bytes of one call (a number or a function of the record))
ROWS = [
    ("8-bit AdamW, full fine-tuning of 8B (bf16 weights and grads), multi-tensor", "adamw8bit_multi",
     "448 LoRA r=16 slices of Llama-3.1-8B bfloat16", 0, FULL_8B * ADAM_BF16),
    ("8-bit AdamW, LoRA r 16 of 8B (448 fp32 factors), one launch", "adamw8bit_multi",
     "448 LoRA r=16 slices of Llama-3.1-8B float32", 0, LORA_8B_R16 * ADAM_FP32),
    ("8-bit AdamW, one 4096 x 14336 bf16 tensor (in-backward hook)", "adamw8bit", "234881024 bfloat16", 0,
     HIDDEN * INTER * ADAM_BF16),
    ("NF4 dequant 4096 x 4096 -> bf16", "nf4_dequant", "4096x4096 bfloat16 blocksize 64 double-quant", 0,
     _nf4(HIDDEN, HIDDEN)),
    ("NF4 dequant 4096 x 14336 -> bf16", "nf4_dequant", "4096x14336 bfloat16 blocksize 64 double-quant", 0,
     _nf4(HIDDEN, INTER)),
    ("RMSNorm forward, 4096 tokens x 4096", "rmsnorm_fwd", "4096x4096 bfloat16", 0,
     2 * 2 * TOKENS * HIDDEN + 2 * HIDDEN + 4 * TOKENS),
    ("RMSNorm backward, 4096 tokens x 4096", "rmsnorm_bwd", "4096x4096 bfloat16", 0, _rmsnorm_bwd),
    ("RoPE forward, q (32 heads)", "rope", "q 2x32x2048x128, k 2x8x2048x128 bfloat16", 0, _rope(HEADS)),
    ("RoPE forward, k (8 heads)", "rope", "q 2x32x2048x128, k 2x8x2048x128 bfloat16", 1, _rope(KV)),
    ("RoPE backward, q", "rope", "q 2x32x2048x128, k 2x8x2048x128 bfloat16 backward", 0, _rope(HEADS)),
    ("RoPE backward, k", "rope", "q 2x32x2048x128, k 2x8x2048x128 bfloat16 backward", 1, _rope(KV)),
    ("SwiGLU forward, 4096 tokens x 14336", "swiglu_fwd", "2x2048x14336 bfloat16", 0, 3 * 2 * TOKENS * INTER),
    ("SwiGLU backward, 4096 tokens x 14336", "swiglu_bwd", "2x2048x14336 bfloat16", 0, 5 * 2 * TOKENS * INTER),
]


def _widths(widths: dict) -> str:
    order = sorted(widths.items(), key=lambda kv: (-_width_bytes(kv[0]), kv[0]))
    return ", ".join(f"{n}×{k}" for k, n in order) or "—"


def _width_bytes(kind: str) -> int:
    vec = int(kind.split(".")[0][1:]) if kind.startswith("v") else 1
    return vec * int(kind.rsplit(".", 1)[-1][1:]) // 8


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def table(records: list) -> str:
    """The markdown table of `ROWS` with the sm_90 records' figures."""
    by_key = {(r["kernel"], r["case"], r["launch"]): r for r in records if r["arch"] == "sm_90"}
    lines = ["| call (Llama-3.1-8B shapes) | bytes a call | roofline H100 SXM / H200 | registers | spills "
             "| programs / SM (occupancy) | global loads a thread (sm_90 PTX) | global stores | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, kernel, case, launch, nbytes in ROWS:
        r = by_key.get((kernel, case, launch))
        if r is None:
            raise KeyError(f"no sm_90 record for {kernel} / {case} / launch {launch}: rerun tests/kernel_compile.py")
        moved = nbytes(r) if callable(nbytes) else nbytes
        roof = " / ".join(_time(moved / bw) for bw in HBM.values())
        spills = r["spill_stores"] + r["spill_loads"]
        lines.append(f"| {label} | {moved / 1e6:,.1f} MB | {roof} | {r['registers']} | {spills} "
                     f"| {r['programs_per_sm']} ({r['occupancy']:.0%}) | {_widths(r['ld_global_widths'])} "
                     f"| {_widths(r['st_global_widths'])} | not yet (no GPU) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else RECORDS, encoding="utf-8") as f:
        print(table(json.load(f)["records"]), end="")


if __name__ == "__main__":
    main()
