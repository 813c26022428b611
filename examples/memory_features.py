"""Measure what the memory features save, with MemoryTracker, on a small model with a large vocabulary.

Each case trains a random 128,256-token-vocabulary Llama for two steps with `minift.train` and
keeps the tracker's breakdown of the first step (the loop tracks it). Three comparisons:

* loss: `loss_chunk_size` None vs 64 tokens (batch 2 x 256); the loss's buffers are "other" at
  the peak, to be compared with one chunk's fp32 logits (64 x 128,256 x 4 B = 31.3 MiB);
* gradients: full fine-tuning with and without `optimizer_in_backward` (loss chunks of 64);
  with it the gradient high-water mark should be the largest parameter (the 128,256 x 64
  embedding);
* activations: gradient checkpointing with and without `activation_offload`; with it the device
  activations should fall to about one layer's recompute, the layer inputs counted as host.

Usage: python examples/memory_features.py --out docs/benchmarks/memory_features_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.files import write_json
from minift.models.config import ModelConfig
from minift.models.llama import Llama

VOCAB, BATCH = 128256, 2
CASES = {
    # name: (TrainConfig overrides, model/batch shape)
    "loss_full_logits": (dict(method="lora", loss_chunk_size=None), dict()),
    "loss_chunked_64": (dict(method="lora", loss_chunk_size=64), dict()),
    "full_ft_step_after_backward": (dict(method="full", max_grad_norm=None, loss_chunk_size=64),
                                    dict()),
    "full_ft_step_in_backward": (dict(method="full", max_grad_norm=None, loss_chunk_size=64,
                                      optimizer_in_backward=True), dict()),
    # longer rows, a wider model and 16-token loss chunks, so that the layer inputs (8 x 2 MiB)
    # outweigh the loss chunk's buffers in the activations
    "checkpointing": (dict(method="lora", gradient_checkpointing=True, loss_chunk_size=16),
                      dict(layers=8, hidden=256, seq=1024)),
    "checkpointing_offload": (dict(method="lora", gradient_checkpointing=True, loss_chunk_size=16,
                                   activation_offload=True), dict(layers=8, hidden=256, seq=1024)),
}
SHAPE = dict(layers=2, hidden=64, seq=256)


def model_for(method: str, shape: dict):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=VOCAB, hidden_size=shape["hidden"],
                              intermediate_size=2 * shape["hidden"],
                              num_hidden_layers=shape["layers"], num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=shape["seq"],
                              torch_dtype="float32"))
    if method == "lora":
        model = minift.lora_wrap(model, r=8)
    return model


def data(n: int, seq: int):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (seq,), generator=g).tolist()),
             "labels": [-100] * 16 + ids[16:]} for _ in range(n)]


def measure(name: str, overrides: dict, shape: dict, out_dir: str) -> dict:
    shape = dict(SHAPE, **shape)
    kw = dict(dict(learning_rate=1e-3, warmup_ratio=0.0, micro_batch_size=BATCH, max_steps=2,
                   bf16=False, progress=False, optimizer="adamw", device="cpu",
                   output_dir=f"{out_dir}/{name}", save_interval=None, keep_last=1), **overrides)
    config = minift.TrainConfig(**kw)
    model = model_for(config.method, shape)
    summary = minift.train(model, data(2 * BATCH, shape["seq"]), config)
    params = [p for p in model.parameters() if p.requires_grad]
    chunk = config.loss_chunk_size
    return {"config": {k: kw[k] for k in overrides}, "shape": dict(shape, batch=BATCH),
            "memory": summary["memory"],
            "largest_trainable_param_bytes": max(p.nbytes for p in params),
            "trainable_bytes": sum(p.nbytes for p in params),
            "layer_input_bytes": BATCH * shape["seq"] * shape["hidden"] * 4,
            "chunk_logits_bytes": chunk * VOCAB * 4 if chunk else None,
            "full_logits_bytes": BATCH * shape["seq"] * VOCAB * 4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, shape) in CASES.items():
            results[name] = measure(name, overrides, shape, tmp)
            mem = results[name]["memory"]
            print(f"{name:30s} peak {mem['peak'] / 2**20:8.2f} MiB  other {mem['other'] / 2**20:7.2f}"
                  f"  gradients {mem['gradients'] / 2**20:7.2f}  activations "
                  f"{mem['activations'] / 2**20:6.2f}  host {mem['host'] / 2**20:6.2f} MiB")
    write_json(args.out, {"what": "MemoryTracker breakdown of the first training step (bytes)",
                          "model": {"vocab_size": VOCAB, "dtype": "float32", "shape": SHAPE},
                          "machine": machine_info(), "commit": git_commit(),
                          "modified": git_modified(),
                          "command": "python " + " ".join(["examples/memory_features.py"] + sys.argv[1:]),
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
