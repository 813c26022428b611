"""The decoding measurements of docs/inference.md, on CPU: ``python examples/infer_bench.py``.

1. examples/base, float32 vs NF4 (default path and ``nf4_inference_cache``) vs transformers (+
   bitsandbytes 4-bit): docs/benchmarks/infer_cpu.json;
2. examples/base with a LoRA adapter, unmerged vs merged vs transformers + peft:
   docs/benchmarks/infer_cpu_adapter.json. The adapter is rank 8 on every linear layer with
   random B (a fresh adapter's B is zero, which would skip nothing): speed does not depend on
   the values;
3. a model of SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 kv heads, MLP 1536,
   vocabulary 49152, tied embeddings) with random weights, float32 vs NF4, batch 1 only, no
   peer: docs/benchmarks/infer_cpu_135m.json.
"""
import os
import sys
import tempfile

import torch

from minift.__main__ import main
from minift.lora.adapter import save_adapter
from minift.lora.layer import lora_layers, lora_wrap
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.loading import load_model, save_model

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "benchmarks")


def make_adapter(base: str, path: str) -> None:
    torch.manual_seed(0)
    model = lora_wrap(load_model(base, dtype=torch.float32), r=8, alpha=16)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    save_adapter(model, path)


def make_135m(path: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    save_model(Llama(config), path)


if __name__ == "__main__":
    base = os.path.join(HERE, "base")
    only = sys.argv[1:] or ["nf4", "adapter", "135m"]
    with tempfile.TemporaryDirectory() as tmp:
        if "nf4" in only:
            main(["bench", "infer", base, "--quant", "nf4", "--batch", "1,8", "--new-tokens", "32",
                  "--rounds", "3", "--out", os.path.join(OUT, "infer_cpu.json")])
        if "adapter" in only:
            make_adapter(base, os.path.join(tmp, "adapter"))
            main(["bench", "infer", base, "--adapter", os.path.join(tmp, "adapter"), "--batch", "1,8",
                  "--new-tokens", "32", "--rounds", "3", "--out", os.path.join(OUT, "infer_cpu_adapter.json")])
        if "135m" in only:
            make_135m(os.path.join(tmp, "m135"))
            main(["bench", "infer", os.path.join(tmp, "m135"), "--quant", "nf4", "--batch", "1",
                  "--new-tokens", "16", "--prompt-tokens", "16", "--rounds", "3", "--no-peer",
                  "--out", os.path.join(OUT, "infer_cpu_135m.json")])
