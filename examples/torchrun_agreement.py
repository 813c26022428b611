"""examples/train_llama.py on N processes (torchrun) against the same flags on one: per-step losses.

    python examples/torchrun_agreement.py --nproc 2 --out docs/benchmarks/torchrun_agreement_cpu.json

With the same flags the N-process run trains on the same samples per step as the 1-process run
(the flags give the global batch), so the losses may differ only by summation order. This runs
both for each method on the CPU (gloo) and records every step's loss and the largest relative
difference, with the machine and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.distributed.parallel import free_port

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_llama.py"


def _run(cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"torchrun_agreement.py: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"losses": losses, "world_size": summary["world_size"], "parallel": summary["parallel"],
            "trained_tokens": summary["trained_tokens"], "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=5, help="rows per micro-batch (odd: split by rows)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    flags = ["--max-steps", str(args.max_steps), "--eval-samples", "1", "--device", "cpu",
             "--batch-size", str(args.batch_size)]
    # where the runs come from, taken before they start (the checkout may move on meanwhile)
    result = {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
              "command": "python examples/torchrun_agreement.py " + " ".join(argv or sys.argv[1:]),
              "cases": []}
    cases = result["cases"]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            base = ["--method", method] + flags
            many = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                    "--master_port", str(free_port()), str(SCRIPT)] + base
            one = [sys.executable, str(SCRIPT)] + base
            got = {"many": _run(many, Path(tmp) / f"{method}-many"), "one": _run(one, Path(tmp) / f"{method}-one")}
            rel = max(abs(a - b) / abs(b) for a, b in zip(got["many"]["losses"], got["one"]["losses"]))
            cases.append({"method": method, "flags": base, "nproc": args.nproc, "max_rel_loss_diff": rel, **got})
            print(f"{method}: {args.nproc} processes vs 1, largest relative loss difference {rel:.2e}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
