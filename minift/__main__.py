"""Command line: ``python -m minift plan ...`` (will it fit?), ``python -m minift bench``
(full vs LoRA vs QLoRA, measured), ``python -m minift bench gpu --out DIR`` (the GPU suite) and
``python -m minift soup a b c --out d`` (adapter soup).
Each command lives in its own module; this one parses and dispatches."""
from __future__ import annotations

import argparse
import sys

from minift import bench, bench_gpu, soup
from minift.memory import plan


class OneLineParser(argparse.ArgumentParser):
    """Bad input ends the run with one line on stderr ("minift bench: error: ...") and exit
    code 2; the usage is one --help away instead of repeated above every error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minift", description="minift command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="estimate memory of full / LoRA / QLoRA fine-tuning on a GPU",
                       description="Estimate full, LoRA and QLoRA memory side by side and say what fits.")
    plan.add_plan_arguments(p)
    b = sub.add_parser("bench", help="run the same short fine-tune three ways and compare",
                       description="Fine-tune full (8-bit AdamW), LoRA and QLoRA on the same data "
                                   "and steps; write a table, JSON and a memory chart.")
    bench.add_bench_arguments(b)
    # `bench` alone is the CPU comparison above; `bench gpu` is a mode of its own with its options
    modes = b.add_subparsers(dest="bench_mode", required=False, metavar="{gpu}")
    g = modes.add_parser("gpu", help="the GPU suite: kernels, bandwidth, 8B-shaped training steps",
                         description="Kernel checks and timings, NF4 dequant and 8-bit AdamW "
                                     "against bandwidth, Llama-3.1-8B-shaped training steps per "
                                     "method, in at most 8 minutes; JSON under --out.")
    bench_gpu.add_bench_gpu_arguments(g)
    s = sub.add_parser("soup", help="average several LoRA adapters of one base (PEFT format)",
                       description="Average PEFT-format LoRA adapters tensor by tensor into a new "
                                   "adapter; adapters of other bases, ranks or targets are refused.")
    soup.add_soup_arguments(s)
    return parser


# command name (with its mode) -> its runner(args, subparser) -> exit code
COMMANDS = {"plan": plan.run_plan, "bench": bench.run_bench, "bench gpu": bench_gpu.run_bench_gpu,
            "soup": soup.run_soup}


def main(argv=None) -> int:
    """Entry point of the ``minift`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    name = args.command
    if getattr(args, "bench_mode", None):
        sub = sub._subparsers._group_actions[0].choices[args.bench_mode]
        name = f"{name} {args.bench_mode}"
    return COMMANDS[name](args, sub)


if __name__ == "__main__":
    sys.exit(main())
