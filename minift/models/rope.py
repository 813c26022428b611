"""RoPE frequencies and cos/sin tables, with the config's `rope_scaling` applied.

Families (config.json `rope_scaling.rope_type`, or the older key `type`), each computed as
transformers 5 computes it (`transformers/modeling_rope_utils.py`), so logits agree to float
rounding:
* ``default``: inv_freq_i = theta ** (-2i / head_dim).
* ``linear`` (position interpolation): inv_freq / factor.
* ``dynamic`` (NTK-aware): the base grows with the sequence length L = max(position_ids) + 1 of
  the forward call once L > max_position_embeddings:
  theta' = theta * (factor * L / max_position_embeddings - (factor - 1)) ** (d / (d - 2)).
  `max_position_embeddings` is the original length here; `original_max_position_embeddings` is
  not read (transformers ignores it too).
* ``yarn`` (arXiv 2309.00071): frequencies that turn more than `beta_fast` times over the original
  length keep their value, those turning fewer than `beta_slow` times are divided by `factor`, a
  linear ramp over the dimensions between; cos and sin are multiplied by the attention factor
  (0.1 ln(factor) + 1 unless `attention_factor` or `mscale` / `mscale_all_dim` say otherwise).
* ``llama3`` (Llama 3.1): long wavelengths divided by `factor`, short ones kept, a smooth band.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from minift.models.config import ROPE_REQUIRED_KEYS, ModelConfig, rope_type

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _check(config: ModelConfig) -> tuple[str, dict]:
    """(rope_type, rope_scaling) after checking that minift implements them; the errors name the field."""
    scaling = config.rope_scaling or {}
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config field 'rope_scaling': unsupported rope_type {kind!r}; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    # checked here too: rope_scaling may have been set after the config's own validation
    missing = [k for k in ROPE_REQUIRED_KEYS.get(kind, ()) if k not in scaling]
    if missing:
        raise ValueError(f"config field 'rope_scaling' (rope_type {kind!r}) is missing "
                         f"{', '.join(missing)}")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):  # Llama-family models rotate the whole head
        raise ValueError(f"config field 'rope_scaling': partial_rotary_factor {partial!r} is not "
                         f"supported (minift rotates the whole head)")
    return kind, scaling


def original_length(config: ModelConfig) -> int:
    """The context length the RoPE scaling starts from (the pre-training length).

    yarn / llama3: `original_max_position_embeddings` (a top-level key of that name wins, as in
    transformers; absent, max_position_embeddings); linear: max_position_embeddings / factor;
    default and dynamic: max_position_embeddings.
    """
    kind, scaling = rope_type(config), config.rope_scaling or {}
    if kind in ("yarn", "llama3"):
        top = config.extra.get("original_max_position_embeddings")
        if top is not None:
            return top
        return scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if kind == "linear":
        return max(1, round(config.max_position_embeddings / scaling["factor"]))
    return config.max_position_embeddings


def _plain_inv_freq(config: ModelConfig, device, theta=None) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / ((config.rope_theta if theta is None else theta) ** exponents)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with the config's rope_scaling applied.

    For ``dynamic`` these are the frequencies of sequences up to max_position_embeddings; longer
    forward calls take `dynamic_inv_freq`.
    """
    kind, scaling = _check(config)
    inv_freq = _plain_inv_freq(config, device)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, original_length(config))
    if kind == "yarn":
        return _yarn_inv_freq(config, scaling, device)
    return inv_freq  # default; dynamic below its original length


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: yarn's attention factor, 1.0 for the others."""
    kind, scaling = _check(config)
    if kind != "yarn":
        return 1.0
    given = scaling.get("attention_factor")
    if given is not None:
        return given
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # DeepSeek's form: the ratio of two temperatures
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    # YaRN eq. 8: sqrt(1/t) = 0.1 ln(s) + 1; no change when nothing is stretched
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict, old_len: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between the
    # two wavelength cut-offs is interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(config: ModelConfig, s: dict, device) -> torch.Tensor:
    dim, theta, factor = config.head_dim, config.rope_theta, s["factor"]
    old_len = original_length(config)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1  # the paper's alpha, beta

    def dim_of(turns: float) -> float:
        # the (fractional) dimension pair whose wavelength fits `turns` times into old_len:
        # old_len / (2 pi theta^(2i/d)) = turns  =>  i = d ln(old_len / (2 pi turns)) / (2 ln theta)
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):  # whole dimensions (a null `truncate` means false, as there)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unchanged frequency), 0: interpolate (divided by factor)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def dynamic_inv_freq(config: ModelConfig, position_ids: torch.Tensor,
                     inv_freq: torch.Tensor) -> torch.Tensor:
    """``dynamic`` frequencies for one forward call: `inv_freq` (the original ones) while the call's
    longest position + 1 stays within max_position_embeddings, NTK-scaled beyond it.

    The length is that of the call, as transformers computes it, but not remembered: transformers
    keeps the frequencies of the longest call seen (until a call shorter than the original
    length), so a later, shorter call past the original length differs there from a fresh
    model. Here each call's logits depend on its own positions only; with a KV cache the
    positions grow every step, and both agree. No host sync: tensor ops and a `where`.
    """
    if position_ids.numel() == 0:
        return inv_freq
    dim, limit, factor = config.head_dim, config.max_position_embeddings, config.rope_scaling["factor"]
    seq_len = position_ids.max() + 1  # int64 scalar tensor on the device
    length = torch.maximum(seq_len, torch.tensor(limit, dtype=seq_len.dtype, device=seq_len.device))
    # float32 scalar math, in transformers' order, so the grown base rounds as theirs does
    theta = config.rope_theta * ((factor * length / limit) - (factor - 1)) ** (dim / (dim - 2))
    grown = _plain_inv_freq(config, inv_freq.device, theta)
    return torch.where(seq_len > limit, grown, inv_freq)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0):
    """cos, sin of shape (B, 1, T, head_dim) for the given positions, cast to `dtype`.

    `attention_factor` (yarn) scales both tables in float32 before the cast, as transformers does;
    the fused RoPE kernel and the reference take the tables as they are, so q and k come out
    scaled by it (and the attention logits by its square).
    """
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rope_key(config: ModelConfig) -> tuple:
    """What the frequencies depend on: a model recomputes its cached ones when this changes."""
    scaling = config.rope_scaling or {}
    return (config.rope_theta, config.head_dim, config.max_position_embeddings,
            config.extra.get("original_max_position_embeddings"),
            repr(sorted(scaling.items())))


def check_rope(config: ModelConfig) -> Optional[str]:
    """Raise ValueError for a rope_scaling minift cannot run; returns its rope_type."""
    return _check(config)[0]
