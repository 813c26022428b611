"""A Llama-family decoder in plain PyTorch (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5).

Module and parameter names equal the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`,
`lm_head.weight`), so checkpoints and adapters map one-to-one without conversion tables. The
numerics follow the reference implementation step by step (RMSNorm in float32, cos/sin computed
in float32 and cast to the activation dtype) so logits agree to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minift.models import fused
from minift.models.attention import ATTENTION_IMPLS, BatchMask, attend, batch_mask, s2_group_size
from minift.models.config import ModelConfig
from minift.models.fused import uses_triton
from minift.models.offload import ActivationOffload
from minift.models.rope import (
    check_rope,
    dynamic_inv_freq,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    rope_key,
)
from minift.tracing import device_is_cuda


class KVCache:
    """Keys and values of earlier positions, one (k, v) pair per decoder layer.

    Each tensor is (B, n_kv_heads, T_past, head_dim), stored after RoPE; a forward call with this
    cache appends its new positions by concatenation. Generation creates one per call.
    """

    def __init__(self, num_layers: int):
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[index]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[index] = (k, v)
        return k, v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_triton(x):  # one kernel: read x once, write y and one float32 rstd per row
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(h, config.q_size, bias=bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(h, config.kv_size, bias=bias)
        # Qwen2 puts a bias on q/k/v only; Llama's attention_bias covers o_proj as well.
        self.o_proj = nn.Linear(config.q_size, h, bias=bias and config.model_type != "qwen2")

    def forward(self, x, cos, sin, mask: BatchMask, kv_cache=None, layer_index=0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        # q and k in one launch; the kernel reads cos/sin in any float dtype and computes in
        # float32, so bf16 q, k beside fp32 cos/sin (fp32 weights under bf16 autocast) take it too
        # and come out in bf16: the reference's float32 result rounded once, as autocast's
        # attention would round it on entry
        if uses_triton(q) and q.dtype == k.dtype:
            q, k = fused.apply_rope(q, k, cos, sin)
        else:
            q, k = fused.apply_rope_reference(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_index, k, v)  # (B, KV, T_past + T, D)
        out = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate) each
        if uses_triton(gate) and gate.dtype == up.dtype:
            return self.down_proj(fused.swiglu(gate, up))  # silu(gate) is never stored
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_tile_size: Optional[int] = None  # tokens per MLP tile; None = whole sequence

    def forward(self, x, cos, sin, mask, kv_cache=None, layer_index=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_index)
        return x + self._mlp(self.post_attention_layernorm(x))

    def _mlp(self, h):
        # At 80k tokens one (T, intermediate) bf16 tensor of Llama-3.1-8B is 2.1 GiB and the MLP
        # keeps four (gate, up, silu, product). Tiles of the sequence, each checkpointed, keep
        # only their (B, tile, hidden) input; backward recomputes one tile at a time.
        tile = self.mlp_tile_size
        if tile is None or h.shape[1] <= tile:
            return self.mlp(h)
        parts = h.split(tile, dim=1)  # (B, tile, hidden) views
        if torch.is_grad_enabled():
            outs = [checkpoint(self.mlp, p, use_reentrant=False) for p in parts]
        else:
            outs = [self.mlp(p) for p in parts]
        return torch.cat(outs, dim=1)


class LlamaModel(nn.Module):
    """The decoder stack; named `model` inside `Llama` to match the checkpoint keys."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def sliding_window(config: ModelConfig) -> Optional[int]:
    """The attention window in tokens, or None when every earlier token is visible."""
    uses_window = config.model_type == "mistral" or config.extra.get("use_sliding_window", False)
    return config.sliding_window if uses_window else None


class Llama(nn.Module):
    """Llama-family causal language model returning logits (B, T, vocab_size).

    Args:
        config: the architecture; see `minift.models.config.ModelConfig`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_rope(config)  # reject unsupported rope_scaling early
        self.config = config
        self.gradient_checkpointing = False
        # "auto": FlexAttention for padded, packed or windowed batches on CUDA, dense SDPA masks
        # elsewhere; "sdpa" / "flex" force one (flex without a cache only; see minift.models.attention).
        self.attention_impl = "auto"
        # Shifted sparse attention (S²-Attn) in training forwards; the training loop switches it
        # on for its steps (TrainConfig.s2_attention). Group size None: a quarter of each forward.
        self.s2_attention = False
        self.s2_group_size: Optional[int] = None
        # With checkpointing on: each checkpointed layer input waits for backward in host memory
        self.activation_offload = False
        self._offload: dict[torch.device, ActivationOffload] = {}
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # (device, what the frequencies depend on) -> inv_freq; a changed config (extend_context)
        # misses the cache instead of reading stale tables
        self._inv_freq: dict[tuple, torch.Tensor] = {}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal init as in the reference, so a fresh model produces sane logits.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Point lm_head at the embedding again (after the embedding Parameter was replaced)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies (head_dim // 2,) float32 for sequences up to the config's
        max_position_embeddings (``dynamic`` scales longer calls in `rope`)."""
        # Kept out of the module's buffers so that model.to(bfloat16) cannot round it.
        key = (device, rope_key(self.config))
        if key not in self._inv_freq:
            for old in [k for k in self._inv_freq if k[1] != key[1]]:
                del self._inv_freq[old]  # tables of an earlier config
            self._inv_freq[key] = rope_inv_freq(self.config, device)
        return self._inv_freq[key]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B, 1, T, head_dim) in `dtype` for `position_ids` (B, T), the config's scaling
        (and yarn's attention factor) applied."""
        inv_freq = self.inv_freq(position_ids.device)
        if check_rope(self.config) == "dynamic":
            inv_freq = dynamic_inv_freq(self.config, position_ids, inv_freq)
        return rope_cos_sin(inv_freq, position_ids, dtype, rope_attention_factor(self.config))

    def offloader(self, device: torch.device) -> ActivationOffload:
        """The activation offloader of `device` (its pooled host buffers are reused)."""
        if device not in self._offload:
            self._offload[device] = ActivationOffload(device)
        return self._offload[device]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) in the compute dtype.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T_past + T) with 1 for tokens and 0 for padding.
            position_ids: (B, T) RoPE positions; default T_past + arange(T).
            segment_ids: (B, T) packed-sample ids (> 0), 0 for padding; tokens attend only within
                their own sample. Not combinable with `kv_cache`.
            kv_cache: a `KVCache` extended in place with this call's keys and values.
            return_hidden: return the final-norm hidden states (B, T, hidden) instead of the
                logits, for a loss that applies `lm_head` a chunk of tokens at a time
                (`minift.objectives.loss`).
        """
        past = kv_cache.length if kv_cache is not None else 0
        self._check_inputs(input_ids, attention_mask, position_ids, segment_ids, kv_cache, past)
        b, t = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = self._mask(t, past, attention_mask, segment_ids, device)
        checkpointing = self.gradient_checkpointing and self.training and kv_cache is None
        offload = self.offloader(device) if checkpointing and self.activation_offload else None
        for i, layer in enumerate(self.model.layers):
            if checkpointing:
                with offload.layer(i, x) if offload else contextlib.nullcontext():
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        x = self.model.norm(x)  # (B, T, hidden)
        return x if return_hidden else self.lm_head(x)

    def _mask(self, t, past, attention_mask, segment_ids, device) -> BatchMask:
        impl = self.attention_impl
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"Llama.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                             f"got {impl!r}")
        use_flex = impl == "flex" or (impl == "auto" and device_is_cuda(device))
        # S²-Attn only while training without a cache: evaluation and generation attend fully
        s2 = s2_group_size(t, self.s2_group_size) if self.s2_attention and self.training \
            and past == 0 else None
        return batch_mask(t, past, attention_mask, segment_ids, sliding_window(self.config),
                          device, use_flex, s2_group=s2, heads=self.config.num_attention_heads)

    def _check_inputs(self, input_ids, attention_mask, position_ids, segment_ids, kv_cache, past):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise ValueError(f"attention_mask must have shape {(b, past + t)} (batch, cached + new "
                             f"tokens), got {tuple(attention_mask.shape)}")
        for name, value in (("position_ids", position_ids), ("segment_ids", segment_ids)):
            if value is not None and tuple(value.shape) != (b, t):
                raise ValueError(f"{name} must have the shape of input_ids {(b, t)}, "
                                 f"got {tuple(value.shape)}")
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids (packed samples) cannot be combined with kv_cache")
