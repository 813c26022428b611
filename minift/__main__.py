"""Command line: ``python -m minift plan ...`` (will it fit?) and ``python -m minift bench``
(full vs LoRA vs QLoRA, measured), whose sub-modes (``bench cpu``: minift's CPU paths against
the peers) time narrower things. Each command lives in its own module; this one parses and
dispatches."""
from __future__ import annotations

import argparse
import sys

from minift import bench, bench_cpu
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
    # `bench` alone keeps its meaning; a mode word after it picks another benchmark
    modes = b.add_subparsers(dest="bench_mode", required=False, metavar="MODE")
    for name, (help_text, add_arguments, _) in BENCH_MODES.items():
        add_arguments(modes.add_parser(name, help=help_text, description=help_text))
    return parser


# command name -> its runner(args, subparser) -> exit code
COMMANDS = {"plan": plan.run_plan, "bench": bench.run_bench}
# bench mode -> (help, add_arguments(subparser), runner(args, subparser) -> exit code)
BENCH_MODES = {
    "cpu": ("time minift's CPU paths (8-bit AdamW, NF4 dequant, train steps) against "
            "bitsandbytes / transformers + peft, interleaved", bench_cpu.add_cpu_arguments,
            bench_cpu.run_cpu),
}


def _subparser(parser, name):
    return parser._subparsers._group_actions[0].choices[name]


def main(argv=None) -> int:
    """Entry point of the ``minift`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = _subparser(parser, args.command)
    mode = getattr(args, "bench_mode", None)
    if mode is not None:
        return BENCH_MODES[mode][2](args, _subparser(sub, mode))
    return COMMANDS[args.command](args, sub)


if __name__ == "__main__":
    sys.exit(main())
