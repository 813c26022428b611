"""Command line: ``python -m minift plan ...`` (will it fit?), ``python -m minift bench``
(full vs LoRA vs QLoRA, measured), ``python -m minift bench gpu --out DIR`` (the GPU suite),
``python -m minift bench cpu`` (minift's CPU paths against the peers, interleaved) and
``python -m minift soup a b c --out d`` (adapter soup).
Each command lives in its own module; this one parses and dispatches."""
from __future__ import annotations

import argparse
import sys

from minift.bench import cpu as bench_cpu
from minift.bench import gpu as bench_gpu
from minift.bench import methods as bench
from minift.cli import OneLineParser, ShowDefaults
from minift.lora import soup
from minift.planning import plan


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minift", description="minift command line")
    sub = parser.add_subparsers(dest="command", required=True)
    # every option has help text, so this formatter shows every default in --help
    shown = ShowDefaults
    p = sub.add_parser("plan", help="estimate memory of full / LoRA / QLoRA fine-tuning on a GPU",
                       description="Estimate full, LoRA and QLoRA memory side by side and say what fits.",
                       formatter_class=shown)
    plan.add_plan_arguments(p)
    b = sub.add_parser("bench", help="run the same short fine-tune three ways and compare",
                       description="Fine-tune full (8-bit AdamW), LoRA and QLoRA on the same data "
                                   "and steps; write a table, JSON and a memory chart.",
                       formatter_class=shown)
    bench.add_bench_arguments(b)
    # `bench` alone is the CPU comparison above; `bench gpu` is a mode of its own with its options
    modes = b.add_subparsers(dest="bench_mode", required=False, metavar="{gpu,cpu}")
    g = modes.add_parser("gpu", help="the GPU suite: kernels, bandwidth, 8B-shaped training steps",
                         description="Kernel checks and timings, NF4 dequant and 8-bit AdamW "
                                     "against bandwidth, Llama-3.1-8B-shaped training steps per "
                                     "method, in at most 8 minutes; JSON under --out.")
    bench_gpu.add_bench_gpu_arguments(g)
    c = modes.add_parser("cpu", help="minift's CPU paths against bitsandbytes / transformers + peft",
                         description="8-bit AdamW step, NF4 dequant and full / LoRA / QLoRA steps, "
                                     "minift and the peer in interleaved rounds; JSON and a table.")
    bench_cpu.add_cpu_arguments(c)
    s = sub.add_parser("soup", help="average several LoRA adapters of one base (PEFT format)",
                       description="Average PEFT-format LoRA adapters tensor by tensor into a new "
                                   "adapter; adapters of other bases, ranks or targets are refused.")
    soup.add_soup_arguments(s)
    return parser


# command name (with its mode) -> its runner(args, subparser) -> exit code
COMMANDS = {"plan": plan.run_plan, "bench": bench.run_bench, "bench gpu": bench_gpu.run_bench_gpu,
            "bench cpu": bench_cpu.run_cpu, "soup": soup.run_soup}


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
