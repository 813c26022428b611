"""Command line: ``python -m minift plan ...`` (will it fit?), ``python -m minift bench``
(with ``memory`` and ``trace``: the traced tables and the trace against the real step)
(full vs LoRA vs QLoRA, measured), ``python -m minift bench gpu --out DIR`` (the GPU suite),
``python -m minift bench cpu`` (minift's CPU paths against the peers, interleaved),
``python -m minift bench infer MODEL_DIR`` (decoding latency and throughput beside transformers),
``python -m minift bench quality --model M`` (task quality of the three methods on a pretrained model),
``python -m minift soup a b c --out d`` (adapter soup), ``python -m minift eval MODEL_DIR``
(passkey retrieval and perplexity by context length) and ``python -m minift export MODEL_DIR
--to gguf -o FILE`` (a GGUF file for llama.cpp / Ollama).
Each command lives in its own module; this one parses and dispatches."""
from __future__ import annotations

import argparse
import sys

from minift.bench import cpu as bench_cpu
from minift.bench import gpu as bench_gpu
from minift.bench import infer as bench_infer
from minift.bench import methods as bench
from minift.bench import quality as bench_quality
from minift.cli import OneLineParser, ShowDefaults
from minift.deploy import command as export_command
from minift.evaluation import command as eval_command
from minift.lora import soup
from minift.planning import agreement, plan, tables


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
    modes = b.add_subparsers(dest="bench_mode", required=False, metavar="{gpu,cpu,memory,trace,infer,quality}")
    g = modes.add_parser("gpu", help="the GPU suite: kernels, bandwidth, 8B-shaped training steps",
                         description="Kernel checks and timings, NF4 dequant and 8-bit AdamW "
                                     "against bandwidth, Llama-3.1-8B-shaped training steps per "
                                     "method, in at most 8 minutes; JSON under --out.")
    bench_gpu.add_bench_gpu_arguments(g)
    c = modes.add_parser("cpu", help="minift's CPU paths against bitsandbytes / transformers + peft",
                         description="8-bit AdamW step, NF4 dequant and full / LoRA / QLoRA steps, "
                                     "minift and the peer in interleaved rounds; JSON and a table.")
    bench_cpu.add_cpu_arguments(c)
    m = modes.add_parser("memory", help="the traced 8B / 70B tables, SFT vs DPO, the longest context",
                         description="Trace Llama-3.1-8B and Llama-3-70B steps on the CUDA path (fake "
                                     "tensors) with and without the memory features, SFT vs DPO, and "
                                     "search the longest QLoRA context in 24 GB and 80 GB; JSON.")
    m.add_argument("--out", default="docs/benchmarks/traced_memory.json", help="JSON result file")
    m.add_argument("--models", default="llama-3.1-8b,llama-3-70b", help="comma-separated presets")
    m.add_argument("--no-longest", action="store_true", help="skip the longest-context search")
    m.add_argument("--no-dpo", action="store_true", help="skip the SFT vs DPO rows")
    t = modes.add_parser("trace", help="the traced estimate against the real step, 33 cases on CPU",
                         description="Every agreement case on fake and on real tensors (FSDP on two gloo "
                                     "processes); JSON with the largest relative difference.")
    t.add_argument("--out", default="docs/benchmarks/trace_agreement.json", help="JSON result file")
    i = modes.add_parser("infer", help="greedy decoding timed: TTFT, per-token P50/P99, tokens/s, memory",
                         description="Decode random prompts with minift (fp32 / NF4, adapter unmerged) and "
                                     "transformers side by side, interleaved; JSON and a table.")
    bench_infer.add_infer_arguments(i)
    q = modes.add_parser("quality", help="task quality of full vs LoRA vs QLoRA on a pretrained model",
                         description="Fine-tune one model full, LoRA and QLoRA on a task for N seeds; "
                                     "task score, held-out loss, forgetting, memory and step time per "
                                     "method; a table, JSON and a PNG.", formatter_class=shown)
    bench_quality.add_quality_arguments(q)
    s = sub.add_parser("soup", help="average several LoRA adapters of one base (PEFT format)",
                       description="Average PEFT-format LoRA adapters tensor by tensor into a new "
                                   "adapter; adapters of other bases, ranks or targets are refused.")
    soup.add_soup_arguments(s)
    e = sub.add_parser("eval", help="passkey retrieval and perplexity by context length of a model",
                       description="Passkey retrieval accuracy over prompt lengths x depths and the "
                                   "perplexity of held-out text by window length; tables, PNGs, JSON.",
                       formatter_class=shown)
    eval_command.add_eval_arguments(e)
    x = sub.add_parser("export", help="write a checkpoint (and a merged adapter) as a GGUF file",
                       description="Export a checkpoint, optionally with a LoRA adapter merged in, as "
                                   "one GGUF file for llama.cpp and Ollama.", formatter_class=shown)
    export_command.add_export_arguments(x)
    return parser


# command name (with its mode) -> its runner(args, subparser) -> exit code
def _bench_memory(args, parser) -> int:
    result = tables.run(args.out, tuple(m for m in args.models.split(",") if m), not args.no_longest,
                        not args.no_dpo)
    print(tables.summary(result))
    return 0


def _bench_trace(args, parser) -> int:
    result = agreement.run(args.out)
    print(f"{len(result['cases'])} cases; largest relative difference {result['max_relative_difference']:.2e}")
    return 0


COMMANDS = {"plan": plan.run_plan, "bench": bench.run_bench, "bench gpu": bench_gpu.run_bench_gpu,
            "bench cpu": bench_cpu.run_cpu, "bench infer": bench_infer.run_infer,
            "bench quality": bench_quality.run_quality, "bench memory": _bench_memory,
            "bench trace": _bench_trace, "soup": soup.run_soup, "eval": eval_command.run_eval,
            "export": export_command.run_export}


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
