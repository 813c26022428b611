"""The traced estimate against the real step: every case run twice on the CPU path, once on fake
tensors (`minift.planning.trace.trace_step`) and once on real ones under the same MemoryTracker
(FSDP cases on two gloo processes, rank 0 reported). ``python -m minift bench trace``
writes the table as JSON; tests/test_trace_agreement.py asserts each case.

The model is a small Llama with grouped-query attention (3 layers, hidden 128, 4 heads over 2
key/value heads, vocabulary 512), batch 2 x 64 unless a case says otherwise.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Optional

import torch

from minift.models.config import ModelConfig
from minift.training.config import TrainConfig

MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
CATEGORY_KEYS = ("frozen_weights", "trainable_params", "gradients", "optimizer_states",
                 "activations", "other", "peak", "host")


def _case(name, method, *, world_size=1, trace=None, **config) -> dict:
    return dict(name=name, method=method, world_size=world_size, trace=trace or {}, config=config)


# method x optimizer (checkpointed, loss in chunks of 32 tokens)
CASES = [_case(f"{m}-{o}", m, optimizer=o, gradient_checkpointing=True, loss_chunk_size=32,
               **({"paged_device_budget": 0} if o == "paged_adamw8bit" else {}))
         for m in ("full", "lora", "qlora") for o in ("adamw", "adamw8bit", "paged_adamw8bit")]
CASES += [
    # each memory feature, alone or with its companions
    _case("lora-plain", "lora"),
    _case("qlora-no-checkpointing", "qlora", loss_chunk_size=None),
    _case("full-full-logits", "full", gradient_checkpointing=True, loss_chunk_size=None),
    _case("lora-offload", "lora", gradient_checkpointing=True, activation_offload=True),
    _case("qlora-offload-chunked", "qlora", gradient_checkpointing=True, activation_offload=True,
          loss_chunk_size=16),
    _case("full-in-backward", "full", gradient_checkpointing=True, optimizer_in_backward=True,
          max_grad_norm=None, optimizer="adamw8bit"),
    _case("lora-in-backward-paged", "lora", gradient_checkpointing=True, optimizer_in_backward=True,
          max_grad_norm=None, optimizer="paged_adamw8bit", paged_device_budget=0),
    _case("qlora-mlp-tiles", "qlora", gradient_checkpointing=True, mlp_tile_size=16),
    _case("full-paged-partial-budget", "full", optimizer="paged_adamw8bit",
          paged_device_budget=200_000),
    _case("lora-padded", "lora", trace={"padded": True}),
    _case("qlora-padded-checkpointed", "qlora", gradient_checkpointing=True, trace={"padded": True}),
    _case("lora-neftune-accum", "lora", neftune_alpha=5.0, grad_accum=2),
    _case("full-fp32", "full", bf16=False, trace={"dtype": "float32"}),
    _case("lora-bf16-adapters", "lora", trace={"adapter_dtype": "bfloat16"}),
    _case("qlora-all-features", "qlora", gradient_checkpointing=True, activation_offload=True,
          optimizer_in_backward=True, max_grad_norm=None, optimizer="paged_adamw8bit",
          paged_device_budget=0, mlp_tile_size=16, loss_chunk_size=16),
    # DPO: the reference is the adapters switched off (LoRA, QLoRA) or a frozen copy (full)
    _case("dpo-lora", "lora", objective="dpo"),
    _case("dpo-qlora-chunked", "qlora", objective="dpo", gradient_checkpointing=True, loss_chunk_size=32),
    _case("dpo-full", "full", objective="dpo", loss_chunk_size=None),
    _case("dpo-full-nf4-reference", "full", objective="dpo", dpo_reference="copy_nf4",
          gradient_checkpointing=True),
    # FSDP2 over two processes (gloo for the real step, the fake process group for the trace)
    _case("fsdp-full", "full", world_size=2, gradient_checkpointing=True),
    _case("fsdp-lora-8bit", "lora", world_size=2, optimizer="adamw8bit"),
    _case("fsdp-qlora", "qlora", world_size=2, gradient_checkpointing=True, loss_chunk_size=32),
    _case("fsdp-dpo-lora", "lora", world_size=2, objective="dpo"),
    # the frozen reference copy's lm_head once ran on DTensor shards here (the real step crashed)
    _case("fsdp-dpo-full-chunked", "full", world_size=2, objective="dpo", loss_chunk_size=32),
]


def model_config() -> ModelConfig:
    return ModelConfig(**MODEL)


def _trace_kwargs(case: dict) -> dict:
    kw = dict(batch_size=2, seq_len=64, device="cpu", world_size=case["world_size"])
    for key, value in case["trace"].items():
        kw[key] = getattr(torch, value) if key in ("dtype", "adapter_dtype") else value
    return kw


def train_config(case: dict) -> TrainConfig:
    return TrainConfig(method=case["method"], **case["config"])


def _numbers(trace) -> dict:
    return {k: v for k, v in trace.as_dict().items() if k in CATEGORY_KEYS + ("moment",)}


def traced(case: dict) -> dict:
    """The case on fake tensors."""
    from minift.planning.trace import trace_step
    return _numbers(trace_step(model_config(), train_config(case), fake=True, **_trace_kwargs(case)))


def measured(case: dict) -> dict:
    """The case on real tensors: in this process, or on ``world_size`` gloo processes (rank 0's)."""
    from minift.planning.trace import trace_step
    if case["world_size"] == 1:
        return _numbers(trace_step(model_config(), train_config(case), fake=False, **_trace_kwargs(case)))
    # each rank a fresh interpreter with a minimal environment: nothing of the calling process
    # (a test session's imports, threads, environment) reaches the measured step
    with tempfile.TemporaryDirectory() as tmp:
        out, port = os.path.join(tmp, "rank0.json"), _free_port()
        env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        code = ("import json, sys; from minift.planning.agreement import _rank; "
                "_rank(int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), json.dumps(case), str(port), out],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(case["world_size"])]
        logs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a rank of the real FSDP step failed: {logs[-1][-2000:]}")
        with open(out) as f:
            return json.load(f)


def _rank(rank: int, case: dict, port: int, out: str) -> None:
    import torch.distributed as dist

    from minift.distributed.settled_gloo import init_settled_gloo
    from minift.planning.trace import trace_step
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # collectives free their buffers where the step does (see minift/distributed/settled_gloo.py)
    init_settled_gloo(rank, case["world_size"])
    try:
        numbers = _numbers(trace_step(model_config(), train_config(case), fake=False, **_trace_kwargs(case)))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(numbers, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(case: dict, formulas: Optional[dict] = None) -> dict:
    """Both runs of a case and their largest relative difference over the categories."""
    fake, real = traced(case), measured(case)
    worst = max((abs(fake[k] - real[k]) / max(real[k], 1) for k in CATEGORY_KEYS), default=0.0)
    row = dict(name=case["name"], method=case["method"], world_size=case["world_size"],
               config=case["config"], trace_settings=case["trace"], traced=fake, measured=real,
               max_relative_difference=worst)
    if formulas is not None:
        row["formulas"] = formulas
    return row



def run(out_path: str) -> dict:
    """Every case, written to ``out_path`` as JSON. The hand-written estimator the trace replaced
    (minift.memory.estimate and its formulas) was run on these cases by its last version; its
    figures are carried over from the file being replaced, case by case, so the drift stays shown."""
    previous = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            old = json.load(f)
        previous = {row["name"]: row.get("formulas") for row in old.get("cases", [])}
        what = old.get("what")
    rows = [compare(case, formulas=previous.get(case["name"])) for case in CASES]
    result = {"what": what if previous else "traced (fake tensors) vs measured (MemoryTracker, real "
              "tensors) per case, CPU path", "cases": rows,
              "max_relative_difference": max(r["max_relative_difference"] for r in rows)}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result
