"""The byte formulas behind `minift.estimate_memory`, one tensor family at a time.

Two concepts: what a training step stores (weights at their storage format, LoRA adapters,
gradients, optimizer states and the step's scratch) and what autograd keeps for backward (per
decoder layer, per adapter and for the head). Each formula follows the tensors that minift's own
modules create (model.py, lora.py, nf4.py, the optimizers); tests/test_estimate.py checks the
sums against `MemoryTracker`. Sizes are in bytes; e is the compute dtype's bytes per value.
"""
from __future__ import annotations

import math

from minift.models.config import ModelConfig
from minift.nf4.dequant import SLICE as DEQUANT_SLICE
from minift.optim.quant8 import CHUNK as CPU_CHUNK


# ---- what a step stores ------------------------------------------------------------------
def nf4_bytes(n: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes of one NF4 double-quantized weight of n values as `minift.nf4.quantize` stores it.

    The packed nibbles, one uint8 absmax code per block (stored padded to whole groups of 256
    blocks), one float32 scale per 256 blocks and the 16-entry float32 NF4 code. The 256-entry
    nested code book is one tensor shared by every layer (`NF4_SHARED_BYTES`).
    """
    blocks = math.ceil(n / blocksize)
    nested = math.ceil(blocks / nested_blocksize)
    return math.ceil(n / 2) + nested * nested_blocksize + 4 * nested + 4 * 16

NF4_SHARED_BYTES = 4 * 256  # the float32 nested code book, one per device


def adam_state_bytes(n: int, elem: int, optimizer: str, min_8bit_size: int = 4096) -> int:
    """Optimizer-state bytes of one trainable tensor of n values stored with `elem` bytes each."""
    if optimizer == "adamw":
        return 2 * n * elem + 4  # exp_avg, exp_avg_sq like the parameter; a float32 step
    if n < min_8bit_size:
        return 8 * n  # small tensors keep float32 moments
    return 2 * n + 2 * 4 * math.ceil(n / 256)


def optimizer_state_bytes(trainable, optimizer) -> int:
    """Optimizer-state bytes on the device for the (n, elem) trainable tensors."""
    if optimizer == "paged_adamw8bit":
        return 0  # host memory pages, streamed to the GPU during the step
    return sum(adam_state_bytes(n, elem, optimizer) for n, elem in trainable)


def step_temporaries(trainable, optimizer, device) -> int:
    """Scratch memory of the optimizer step."""
    largest = max((n for n, _ in trainable), default=0)
    if optimizer == "adamw":
        if device == "cuda":
            # the foreach implementation (torch's default on CUDA) builds sqrt(v) for all
            # parameters at once
            return sum(n * s for n, s in trainable)
        # the per-tensor loop (the CPU default): sqrt(v) and its scaled copy of one tensor
        return 2 * max((n * s for n, s in trainable), default=0)
    if device == "cuda":
        return 0  # the fused Triton kernel updates codes, absmax and weights in place
    # the CPU step (minift.optim.quant8.adamw8bit_step_cpu) works on float32, int32 and bool
    # buffers of one chunk of CPU_CHUNK values at a time: 33 bytes per value of the chunk,
    # measured with MemoryTracker (float32 and bf16 parameters alike)
    return 33 * min(largest, CPU_CHUNK)


def layer_tensors(cfg: ModelConfig) -> list:
    """(name, n_values, is_decoder_linear) of every parameter, as minift.models.llama.Llama holds them."""
    out = []
    shapes = cfg.linear_shapes()
    for _ in range(cfg.num_hidden_layers):
        for name, (i, o) in shapes.items():
            out.append((name, i * o, True))
        if cfg.attention_bias:
            out += [("q_bias", cfg.q_size, False), ("k_bias", cfg.kv_size, False),
                    ("v_bias", cfg.kv_size, False)]
            if cfg.model_type != "qwen2":
                out.append(("o_bias", cfg.hidden_size, False))
        if cfg.mlp_bias:
            out += [("gate_bias", cfg.intermediate_size, False),
                    ("up_bias", cfg.intermediate_size, False), ("down_bias", cfg.hidden_size, False)]
        out += [("input_layernorm", cfg.hidden_size, False),
                ("post_attention_layernorm", cfg.hidden_size, False)]
    out.append(("embed_tokens", cfg.vocab_size * cfg.hidden_size, False))
    out.append(("norm", cfg.hidden_size, False))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head", cfg.vocab_size * cfg.hidden_size, False))
    return out


def weight_bytes(cfg, method, targets, r, e, ae, blocksize):
    """(frozen bytes, list of (n, elem) trainable tensors)."""
    frozen, trainable = 0, []
    for _, n, is_linear in layer_tensors(cfg):
        if method == "full":
            trainable.append((n, e))
        elif method == "qlora" and is_linear:
            frozen += nf4_bytes(n, blocksize)
        else:
            frozen += n * e
    if method == "qlora":
        frozen += NF4_SHARED_BYTES
    if method != "full":
        shapes = cfg.linear_shapes()
        for _ in range(cfg.num_hidden_layers):
            for name in targets:
                i, o = shapes[name]
                trainable += [(r * i, ae), (o * r, ae)]  # lora_A (r, in), lora_B (out, r)
    return frozen, trainable


def layer_gradient_bytes(cfg, method, targets, r, e, ae) -> dict:
    """Gradient bytes of one decoder layer ("layer") and of its down_proj alone."""
    shapes = cfg.linear_shapes()
    if method == "full":
        one = {name: e * i * o for name, (i, o) in shapes.items()}
        norms = 2 * e * cfg.hidden_size  # + biases, small; left out
        return {"layer": sum(one.values()) + norms, "down_proj": one["down_proj"]}
    one = {name: ae * r * (i + o) for name, (i, o) in shapes.items() if name in targets}
    return {"layer": sum(one.values()), "down_proj": one.get("down_proj", 0)}


# ---- what autograd keeps for backward ---------------------------------------------------
def layer_saved(cfg, method, targets, r, e, batch, seq, input_grad, masked=True):
    """Bytes one decoder layer keeps for backward (minift.models.llama.DecoderLayer), by term."""
    h, i, q, kv, heads = (cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size,
                          cfg.num_attention_heads)
    full = method == "full"
    shapes = cfg.linear_shapes()
    n_tok = batch * seq
    t = {}
    # RMSNorm: float32 input (or the input itself when e == 4) and rsqrt (N, 1) when the input
    # needs a gradient; the normalised value cast to e when the norm weight is trained.
    norm = (4 * h + 4) * n_tok
    t["input_layernorm"] = (norm if input_grad else 0) + (e * h * n_tok if full else 0)
    t["post_attention_layernorm"] = norm + (e * h * n_tok if full else 0)
    # inputs of the projections: the normed x (shared by q/k/v and by gate/up); o_proj's input is
    # the attention output's storage; down_proj's input is the SwiGLU product.
    attn_in = full or any(name in targets for name in ("q_proj", "k_proj", "v_proj"))
    mlp_in = full or any(name in targets for name in ("gate_proj", "up_proj"))
    t["attn_input"] = e * h * n_tok if attn_in else 0
    t["mlp_input"] = e * h * n_tok if mlp_in else 0
    # scaled_dot_product_attention keeps q, k, v (after RoPE), the output and a float32
    # log-sum-exp per head and token.
    t["attention"] = (e * (2 * q + 2 * kv) + 4 * heads) * n_tok
    # it also turns the boolean (B, 1, T, T) padding mask into an additive one in the compute
    # dtype, in every layer, and keeps it
    t["attention_mask"] = e * batch * seq * seq if masked else 0
    # SwiGLU: silu keeps gate's output, the product keeps silu(gate) and up's output.
    t["swiglu"] = 3 * e * i * n_tok
    t["down_input"] = e * i * n_tok if (full or "down_proj" in targets) else 0
    if not full:
        t["lora"] = sum(adapter_saved(shapes[name], r, e, n_tok,
                                       input_grad or name not in ("q_proj", "k_proj", "v_proj"))
                        for name in targets)
    return t


def adapter_saved(shape, r, e, n_tok, grad_in) -> int:
    """Bytes one LoRA adapter keeps: lora_B's input (N, r); the casted copies of B (out, r) and,
    when the input needs a gradient, of A (r, in)."""
    fin, fout = shape
    return e * r * n_tok + e * r * fout + (e * r * fin if grad_in else 0)


def head_saved(cfg, method, e, batch, seq):
    """Bytes kept for backward outside the decoder layers, by term."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    n_tok = batch * seq
    full = method == "full"
    t = {
        "embedding_ids": 8 * n_tok if full else 0,
        "rope_cos_sin": 2 * e * d * n_tok,
        "final_norm": (4 * h + 4) * n_tok + (e * h * n_tok if full else 0),
        "lm_head_input": e * h * n_tok if full else 0,
        # cross_entropy keeps its float32 log-softmax (B*T, V: the labels are shifted, the last
        # position ignored), the targets and a scalar
        "loss": 4 * v * n_tok + 8 * n_tok + 4,
    }
    return t


def down_proj_saved(cfg, method, targets, r, e, n_tok, freed=False):
    """What a layer's down_proj saves (its input, its adapter's tensors) after the NF4 matmul
    of its base weight ran; with `freed`, the bytes its backward has released once its weight
    gradient exists (its input)."""
    if freed:
        return e * cfg.intermediate_size * n_tok if (method == "full" or "down_proj" in targets) \
            else 0
    if method == "full" or "down_proj" not in targets:
        return {"input": 0, "adapter": 0}
    return {"input": e * cfg.intermediate_size * n_tok,
            "adapter": adapter_saved(cfg.linear_shapes()["down_proj"], r, e, n_tok, True)}


def dequant_scratch(cfg: ModelConfig, device: str, e: int) -> int:
    """Bytes alive while one NF4 weight (the largest decoder linear, n values) is dequantized.

    CPU (`minift.nf4.dequant`): the output (e n bytes) plus one slice's int32 byte indices and
    int64 pair words, 6 bytes per value of a slice of at most DEQUANT_SLICE values. CUDA (the
    Triton kernel): the output only, e n bytes (not measured: no GPU).
    """
    n = max(i * o for i, o in cfg.linear_shapes().values())
    return e * n + (6 * min(n, DEQUANT_SLICE) if device == "cpu" else 0)
