"""Memory of a training step from first principles: parameter counts times bytes per element.

The formulas (docs/memory.md explains them; N = batch_size * seq_len tokens, e = bytes of the
compute dtype, h = hidden size, i = intermediate size):

* weights: every tensor of `minift.model.Llama` at its storage format: `dtype` for full and LoRA,
  NF4 for QLoRA's decoder linears (n/2 packed bytes + one uint8 absmax code per 64 values + one
  float32 per 256 codes + the 16- and 256-entry code books: ~4.127 bits per parameter).
* LoRA adapters: r * (in + out) per adapted linear, in `adapter_dtype` (float32).
* gradients: one per trainable value, in the trainable tensor's dtype.
* optimizer states: "adamw" (torch.optim.AdamW) keeps two moments in the parameter's dtype;
  "adamw8bit" / "paged_adamw8bit" keep two uint8 codes per value plus a float32 absmax per 256
  values, and float32 moments for tensors smaller than 4096 values.
* activations: what `minift.model.Llama` and `minift.train`'s loss keep for backward, term by
  term (`_layer_saved`, `_head_saved`), derived by listing the tensors autograd saves.
* other: the loss's buffers (logits and their float32 copy, or the two float32 logit gradients at
  the start of backward) or the optimizer's temporaries during its step, whichever moment is
  the peak.

The total is the peak of two moments: the end of the loss (weights + states + activations +
logits) and the optimizer step (weights + states + gradients + step temporaries).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Union

import torch

from minift.config import ModelConfig
from minift.memory.tracker import CATEGORIES, breakdown_table

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MemoryEstimate:
    """Estimated bytes per category for one training step; `total` is the estimated peak."""

    frozen_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    activations: int
    other: int
    total: int
    settings: dict = field(default_factory=dict)
    terms: dict = field(default_factory=dict)  # named parts of the activations and other

    def as_dict(self) -> dict:
        out = {c: int(getattr(self, c)) for c in CATEGORIES}
        out["total"] = int(self.total)
        return out

    def table(self) -> str:
        s = self.settings
        title = (f"{s.get('method')} | batch {s.get('batch_size')} x seq {s.get('seq_len')} | "
                 f"optimizer {s.get('optimizer')}")
        return breakdown_table({title: self.as_dict()})


def _elem(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return torch.finfo(dtype).bits // 8


def nf4_bytes(n: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes of one NF4 double-quantized weight of n values as `minift.nf4` stores it.

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


def _resolve_config(config_or_preset) -> ModelConfig:
    if isinstance(config_or_preset, ModelConfig):
        return config_or_preset
    if isinstance(config_or_preset, str):
        return ModelConfig.from_name(config_or_preset)
    raise TypeError(f"config_or_preset must be a ModelConfig or a preset name, "
                    f"got {type(config_or_preset).__name__}")


def _targets(target_modules) -> tuple:
    if target_modules == "all-linear":
        return LINEARS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    try:
        names = tuple(target_modules)
    except TypeError:
        raise TypeError(f"target_modules must be 'all-linear' or a list of names, got "
                        f"{type(target_modules).__name__}") from None
    if not names:
        raise ValueError(f"target_modules is empty: nothing would be adapted; use 'all-linear' or "
                         f"a list of {', '.join(LINEARS)}")
    unknown = [t for t in names if t not in LINEARS]
    if unknown:
        raise ValueError(f"target_modules: unknown names {unknown}; use 'all-linear' or a list "
                         f"of {', '.join(LINEARS)}")
    # lora_wrap adapts a module once however often it is named, so count it once
    return tuple(dict.fromkeys(names))


def _positive(name: str, value) -> int:
    """`value` as an int if it is a positive integer of any integral type (int, numpy ints)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive integer, got bool {value!r}")
    try:
        n = operator.index(value)  # int, numpy integers, ...; not floats
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} "
                        f"{value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _flag(name: str, value) -> bool:
    # a string such as "no" is truthy: demand a real bool rather than guess
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _layer_tensors(cfg: ModelConfig) -> list:
    """(name, n_values, is_decoder_linear) of every parameter, as minift.model.Llama holds them."""
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


def _weights(cfg, method, targets, r, e, ae, blocksize):
    """(frozen bytes, list of (n, elem) trainable tensors)."""
    frozen, trainable = 0, []
    for _, n, is_linear in _layer_tensors(cfg):
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


def _layer_saved(cfg, method, targets, r, e, batch, seq, input_grad, masked=True):
    """Bytes one decoder layer keeps for backward (minift.model.DecoderLayer), by term."""
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
        t["lora"] = sum(_adapter_saved(shapes[name], r, e, n_tok,
                                       input_grad or name not in ("q_proj", "k_proj", "v_proj"))
                        for name in targets)
    return t


def _adapter_saved(shape, r, e, n_tok, grad_in) -> int:
    """Bytes one LoRA adapter keeps: lora_B's input (N, r); the casted copies of B (out, r) and,
    when the input needs a gradient, of A (r, in)."""
    fin, fout = shape
    return e * r * n_tok + e * r * fout + (e * r * fin if grad_in else 0)


def _head_saved(cfg, method, e, batch, seq):
    """Bytes kept for backward outside the decoder layers, by term."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    n_tok, n_loss = batch * seq, batch * (seq - 1)
    full = method == "full"
    t = {
        "embedding_ids": 8 * n_tok if full else 0,
        "rope_cos_sin": 2 * e * d * n_tok,
        "final_norm": (4 * h + 4) * n_tok + (e * h * n_tok if full else 0),
        "lm_head_input": e * h * n_tok if full else 0,
        # cross_entropy keeps its float32 log-softmax (B*(T-1), V), the targets and a scalar
        "loss": 4 * v * n_loss + 8 * n_loss + 4,
    }
    return t


def estimate_memory(config_or_preset: Union[ModelConfig, str], method: str = "lora",
                    batch_size: int = 1, seq_len: int = 512, r: int = 16,
                    target_modules="all-linear", optimizer: str = "adamw",
                    gradient_checkpointing: bool = False, dtype: torch.dtype = torch.bfloat16, *,
                    adapter_dtype: torch.dtype = torch.float32, blocksize: int = 64,
                    attention_mask: bool = True, device: str = "cuda") -> MemoryEstimate:
    """Estimate the memory of one training step of minift, by category, in bytes.

    Args:
        config_or_preset: a `ModelConfig` or a preset name from `minift.config.PRESETS`.
        method: "full", "lora" or "qlora".
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        r: LoRA rank (lora and qlora).
        target_modules: "all-linear" or a list of decoder linear names ("q_proj", ...); a name
            given twice counts once, as `lora_wrap` adapts each module once.
        optimizer: "adamw", "adamw8bit" or "paged_adamw8bit".
        gradient_checkpointing: recompute each decoder layer in backward.
        dtype: the dtype the model's weights and activations are stored in.
        adapter_dtype: dtype of the LoRA weights.
        blocksize: NF4 block size (QLoRA).
        attention_mask: whether batches carry padding (or packed samples), which the model
            expands to a (B, 1, T, T) mask; batches without padding take the fused causal path.
        device: "cuda" or "cpu"; only the optimizer step's scratch memory depends on it
            (foreach AdamW and the fused 8-bit kernel on CUDA, per-tensor loops on CPU).

    Returns:
        A `MemoryEstimate`; `total` is the estimated peak.

    Raises:
        TypeError: batch_size, seq_len or r not an integer (any integral type such as numpy
            ints is accepted; bools and floats are not), gradient_checkpointing or
            attention_mask not a bool, a bad dtype or config type.
        ValueError: an unknown method, optimizer, device or target module name, an empty
            target_modules, a non-positive size, or seq_len beyond the model's
            max_position_embeddings. Each message names the argument.
    """
    cfg = _resolve_config(config_or_preset)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    batch_size = _positive("batch_size", batch_size)
    seq_len = _positive("seq_len", seq_len)
    r = _positive("r", r)
    gradient_checkpointing = _flag("gradient_checkpointing", gradient_checkpointing)
    attention_mask = _flag("attention_mask", attention_mask)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    e, ae = _elem(dtype), _elem(adapter_dtype)
    targets = LINEARS if method == "full" else _targets(target_modules)
    # checked last: the arguments themselves first, then whether the model can take them
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")

    frozen, trainable = _weights(cfg, method, targets, r, e, ae, blocksize)
    trainable_bytes = sum(n * s for n, s in trainable)
    states = sum(adam_state_bytes(n, s, optimizer) for n, s in trainable)
    if optimizer == "paged_adamw8bit":
        states = 0  # host memory pages, streamed to the GPU during the step

    n_tok = batch_size * seq_len
    n_loss = batch_size * (seq_len - 1)
    h, v = cfg.hidden_size, cfg.vocab_size
    hidden = e * h * n_tok  # one hidden state (B, T, h)
    terms = _head_saved(cfg, method, e, batch_size, seq_len)
    layers = [_layer_saved(cfg, method, targets, r, e, batch_size, seq_len,
                           input_grad=(i > 0 or method == "full"), masked=attention_mask)
              for i in range(cfg.num_hidden_layers)]
    per_layer = [sum(t.values()) for t in layers]
    # the head's saved tensors are alive from the end of the forward to the start of backward
    head_terms = {k: terms.pop(k) for k in ("final_norm", "lm_head_input", "loss")}
    head = sum(head_terms.values())
    shared = sum(terms.values())  # token ids, cos/sin: alive from the embedding to the end
    if gradient_checkpointing:
        # Each layer keeps only its inputs (hidden state; cos, sin and the boolean mask are
        # shared). Backward recomputes one layer at a time after the head's tensors are gone;
        # what the recompute keeps is that layer's saved set plus its residual sum.
        terms["layer_inputs"] = cfg.num_hidden_layers * hidden
        terms["attention_mask_bool"] = batch_size * seq_len * seq_len if attention_mask else 0
        base = sum(terms.values())
        # torch stops a recompute once the layer's last saved tensor exists; the frames it
        # unwinds still hold the residual x + attention and, when down_proj is an adapter
        # whose lora branch saves last, the base layer's output: both counted as kept
        adapted_down = method != "full" and "down_proj" in targets
        recomputed = max(per_layer) + hidden + (hidden if adapted_down else 0)
        terms["head_or_recomputed_layer"] = max(head, recomputed)
    else:
        for name in layers[-1]:
            terms["layers." + name] = sum(t[name] for t in layers)
        base = sum(terms.values())
        terms.update(head_terms)
    activations = sum(terms.values())  # the high-water mark; the terms add up to it

    weights = frozen + trainable_bytes
    fixed = weights + states
    step_tmp = _step_temporaries(trainable, optimizer, device)
    # The moments that can hold the peak: (name, live bytes, of which "other").
    # minift.train drops the logits once the loss is computed, so the loss has two moments:
    # computing it (logits in the compute dtype + their float32 copy) and the start of backward
    # (the float32 gradient cross_entropy hands to log_softmax + the one it returns).
    logits = e * v * n_tok + 4 * v * n_loss
    logit_grads = 2 * 4 * v * n_loss
    moments = [("loss", fixed + base + head + logits, logits),
               ("backward_start", fixed + base + head + logit_grads, logit_grads),
               ("optimizer_step", fixed + trainable_bytes + step_tmp, step_tmp)]
    scratch = _dequant_scratch(cfg, device, e) if method == "qlora" else 0
    down = _down_proj_saved(cfg, method, targets, r, e, n_tok)
    if gradient_checkpointing:
        # recomputing the top layer: the head's gradients (full) and two hidden-state gradients
        # are alive
        head_grads = e * h * (v + 1) if method == "full" else 0
        if scratch:
            # the recompute's dequantization of the top layer's down_proj: the layer's kept
            # tensors but down_proj's adapter ones, the residual x + attention, two hidden-state
            # gradients and the dequantization scratch
            moments.append(("recompute_dequant", fixed + shared + terms["layer_inputs"]
                            + terms["attention_mask_bool"] + max(per_layer) - down["adapter"]
                            + hidden + head_grads + 2 * hidden + scratch,
                            2 * hidden + scratch))
        moments.append(("recompute", fixed + base + recomputed + head_grads + 2 * hidden,
                        2 * hidden))
        # backward through a recomputed layer's MLP, just after down_proj's weight gradient:
        # the layer's recomputed tensors (less down_proj's input, now freed), the inputs of
        # this and the lower layers, the gradients of every layer above, and as scratch the
        # output's gradient and three (B, T, intermediate) gradients of the SwiGLU. The top
        # layer has the most inputs alive, the bottom one the most gradients (full).
        layer_grads = _layer_trainable_bytes(cfg, method, targets, r, e, ae)
        scratch_bwd = 3 * e * cfg.intermediate_size * n_tok + hidden
        for k in {0, cfg.num_hidden_layers - 1}:
            moments.append((f"backward_layer_{k}", fixed + shared
                            + terms["attention_mask_bool"] + (k + 1) * hidden + per_layer[k]
                            - _down_proj_saved(cfg, method, targets, r, e, n_tok, freed=True)
                            + head_grads + (cfg.num_hidden_layers - 1 - k) * layer_grads["layer"]
                            + layer_grads["down_proj"] + scratch_bwd, scratch_bwd))
    elif scratch:
        # NF4 forward of the last layer's down_proj: every earlier saved tensor is alive, its
        # input (the SwiGLU product) is not saved yet, and the layer's input and its residual
        # sum are held
        moments.append(("forward_dequant", fixed + base - down["input"] - down["adapter"]
                        + e * cfg.intermediate_size * n_tok + 2 * hidden + scratch,
                        e * cfg.intermediate_size * n_tok + 2 * hidden + scratch))
    peak_name, total, other = max(moments, key=lambda m: m[1])
    settings = dict(model=getattr(cfg, "name", None), method=method, batch_size=batch_size,
                    seq_len=seq_len, r=r if method != "full" else None, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, dtype=str(dtype),
                    peak_moment=peak_name)
    terms.update(loss_buffers=max(logits, logit_grads), step_temporaries=step_tmp,
                 dequant_scratch=scratch)
    return MemoryEstimate(frozen_weights=frozen, trainable_params=trainable_bytes,
                          gradients=trainable_bytes, optimizer_states=states,
                          activations=activations, other=other, total=total,
                          settings=settings, terms=terms)


def _down_proj_saved(cfg, method, targets, r, e, n_tok, freed=False):
    """What a layer's down_proj saves (its input, its adapter's tensors) after the NF4 matmul
    of its base weight ran; with `freed`, the bytes its backward has released once its weight
    gradient exists (its input)."""
    if freed:
        return e * cfg.intermediate_size * n_tok if (method == "full" or "down_proj" in targets) \
            else 0
    if method == "full" or "down_proj" not in targets:
        return {"input": 0, "adapter": 0}
    return {"input": e * cfg.intermediate_size * n_tok,
            "adapter": _adapter_saved(cfg.linear_shapes()["down_proj"], r, e, n_tok, True)}


def _layer_trainable_bytes(cfg, method, targets, r, e, ae) -> dict:
    """Gradient bytes of one decoder layer ("layer") and of its down_proj alone."""
    shapes = cfg.linear_shapes()
    if method == "full":
        one = {name: e * i * o for name, (i, o) in shapes.items()}
        norms = 2 * e * cfg.hidden_size  # + biases, small; left out
        return {"layer": sum(one.values()) + norms, "down_proj": one["down_proj"]}
    one = {name: ae * r * (i + o) for name, (i, o) in shapes.items() if name in targets}
    return {"layer": sum(one.values()), "down_proj": one.get("down_proj", 0)}


def _dequant_scratch(cfg, device, e) -> int:
    """Bytes alive while one NF4 weight (the largest decoder linear, n values) is dequantized.

    CPU (the pure-torch reference): at the code-book gather the unpacked nibbles (n uint8), the
    per-value scale (n float32), the int64 indices (n) and the gathered values (n float32) are
    alive: 17 n bytes, measured with MemoryTracker. CUDA (the Triton kernel): the output only,
    e n bytes (not measured: no GPU).
    """
    n = max(i * o for i, o in cfg.linear_shapes().values())
    return 17 * n if device == "cpu" else e * n


def _step_temporaries(trainable, optimizer, device) -> int:
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
    # the pure-torch reference works on float32 (and int64 index) copies of one tensor at a
    # time: about 48 bytes per value of the largest tensor, measured with MemoryTracker
    return 48 * largest
