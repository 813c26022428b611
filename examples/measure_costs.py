"""Two measured costs behind defaults of minift, written to one JSON file.

1. CRC-32 of checkpoint files (verified on every resume): zlib.crc32 streamed in 4 MiB chunks
   over files of random bytes the size of a 7B LoRA adapter's checkpoint and of a 1B model.
2. Training step time on the shipped base for each compute dtype: float32 weights, float32
   weights under bf16 autocast, bfloat16 weights; LoRA and full fine-tuning. This picks
   examples/train_llama.py's default --dtype on a CPU.

    python examples/measure_costs.py --out docs/benchmarks/checksum_and_dtype_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.checkpoints.steps import file_crc32
from minift.data.sft import load_dataset
from minift.models.config import ModelConfig

HERE = Path(__file__).resolve().parent


def _random_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 26)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def crc_costs(folder: Path) -> list:
    """Seconds of file_crc32 over a 7B LoRA checkpoint's files and a 1B model's weights."""
    lora = minift.estimate_memory("llama-2-7b", "lora", 1, 512, r=16)  # adapters in fp32, AdamW states
    one_b = ModelConfig.from_name("llama-3.2-1b").num_parameters()
    cases = [("7B LoRA r=16 adapter (fp32)", lora.trainable_params),
             ("7B LoRA r=16 checkpoint (adapter + AdamW states)",
              lora.trainable_params + lora.optimizer_states),
             ("1B model weights (bf16)", 2 * one_b)]
    out = []
    for name, size in cases:
        path = folder / "blob"
        _random_file(path, size)
        times = []
        for _ in range(3):  # the file is in the page cache after writing: this times the CRC
            t0 = time.perf_counter()
            file_crc32(path)
            times.append(time.perf_counter() - t0)
        out.append({"case": name, "bytes": size, "seconds": times,
                    "median_s": statistics.median(times),
                    "MB_per_s": size / statistics.median(times) / 1e6})
        print(f"crc32 {name}: {size / 2**20:.0f} MiB in {statistics.median(times):.3f} s",
              file=sys.stderr)
        path.unlink()
    return out


def step_times(folder: Path, steps: int) -> list:
    """Median step time (untracked steps) for each method and compute dtype on examples/base."""
    tok = minift.load_tokenizer(HERE / "base")
    data, _ = load_dataset(HERE / "data" / "train.jsonl", tok, 64)
    out = []
    for method in ("lora", "full"):
        for name, dtype, autocast in (("float32", torch.float32, False),
                                      ("float32 + bf16 autocast", torch.float32, True),
                                      ("bfloat16", torch.bfloat16, False)):
            torch.manual_seed(0)
            model = minift.load_model(HERE / "base", dtype=dtype)
            if method == "lora":
                minift.lora_wrap(model, r=8, alpha=16)
            else:
                model.requires_grad_(True)
            run = folder / f"{method}-{name.replace(' ', '_')}"
            config = minift.TrainConfig(method=method, max_steps=steps, micro_batch_size=16,
                                        bf16=autocast, learning_rate=1e-3, progress=False,
                                        device="cpu", output_dir=str(run), keep_last=1)
            minift.train(model, data, config)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            seconds = [x["tokens"] / x["tokens_per_s"] for x in lines[1:]]  # step 1 is tracked
            out.append({"method": method, "compute": name, "step_seconds": seconds,
                        "median_s": statistics.median(seconds)})
            print(f"{method} {name}: {statistics.median(seconds):.4f} s/step", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/benchmarks/checksum_and_dtype_cpu.json")
    p.add_argument("--steps", type=int, default=12, help="training steps per dtype")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        record = {"command": "python examples/measure_costs.py " + " ".join(sys.argv[1:]),
                  "machine": machine_info(), "threads": args.threads, "git_commit": git_commit(),
                  "git_modified": git_modified(), "crc32": crc_costs(Path(tmp)),
                  "step_time": step_times(Path(tmp), args.steps)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
