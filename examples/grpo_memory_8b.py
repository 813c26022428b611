"""The memory of SFT, DPO and GRPO for Llama-3.1-8B on one GPU, traced (docs/rl.md's table).

Every figure comes from running minift's own step on fake tensors on the CUDA path: SFT and DPO
through ``minift.estimate_memory`` and GRPO's three stages through
``minift.planning.grpo_memory.trace_grpo_step``. All three see the same 4,096 tokens a step:

* SFT: 8 sequences of 512 tokens;
* DPO: 4 pairs of 512 (8 sequences);
* GRPO: 2 prompts of 256 tokens x G = 4 completions of 256 new tokens (8 sequences of 512).

bf16 weights, LoRA r 16 on every linear with float32 adapters, AdamW (float32 states), the
loop's default loss chunking; each case without and with gradient checkpointing. A GRPO trace
takes seconds on a CPU (its rollout skips the middle decode steps, changing no byte).

    python examples/grpo_memory_8b.py --out docs/benchmarks/grpo_memory_8b_traced.json
"""
from __future__ import annotations

import argparse
import sys
import time

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.files import write_json
from minift.planning.grpo_memory import trace_grpo_step
from minift.training.config import TrainConfig

PRESET, SEQ, PROMPTS, GROUP, PROMPT_LEN, NEW = "llama-3.1-8b", 512, 2, 4, 256, 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/benchmarks/grpo_memory_8b_traced.json")
    p.add_argument("--methods", default="lora,qlora,full")
    args = p.parse_args(argv)
    out = {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
           "command": "python examples/grpo_memory_8b.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "preset": PRESET, "tokens_per_step": 8 * SEQ, "cases": {}}
    for method in args.methods.split(","):
        for checkpointing in (False, True):
            tag = "+checkpointing" if checkpointing else ""
            for objective, batch in (("sft", 8), ("dpo", 4)):
                started = time.perf_counter()
                e = minift.estimate_memory(PRESET, method, batch, SEQ, device="cuda", objective=objective,
                                           gradient_checkpointing=checkpointing)
                out["cases"][f"{method}/{objective}{tag}"] = {
                    "batch_size": batch, "seq_len": SEQ, **e.as_dict(),
                    "train_config": e.settings["train_config"], "seconds": round(time.perf_counter() - started, 1)}
            started = time.perf_counter()
            config = TrainConfig(objective="grpo", method=method, grpo_group_size=GROUP,
                                 gradient_checkpointing=checkpointing)
            trace = trace_grpo_step(PRESET, config, prompts=PROMPTS, prompt_len=PROMPT_LEN, new_tokens=NEW,
                                    device="cuda")
            out["cases"][f"{method}/grpo{tag}"] = {
                "prompts": PROMPTS, "group": GROUP, "prompt_len": PROMPT_LEN, "new_tokens": NEW,
                "kv_cache": trace.kv_cache, "stages": {k: v.as_dict() for k, v in trace.stages.items()},
                "peak": trace.peak, "peak_stage": trace.peak_stage, "reserved": trace.reserved,
                "reserved_expandable": trace.reserved_expandable,
                "seconds": round(time.perf_counter() - started, 1)}
            write_json(args.out, out)
            peaks = {k: round(v["peak"] / 2**30, 2) for k, v in out["cases"][f"{method}/grpo{tag}"]["stages"].items()}
            print(f"{method}{tag}: SFT {out['cases'][f'{method}/sft{tag}']['total'] / 2**30:.2f} GiB, "
                  f"DPO {out['cases'][f'{method}/dpo{tag}']['total'] / 2**30:.2f} GiB, GRPO {peaks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
