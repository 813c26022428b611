"""Model configuration: one flat dataclass read from a Hugging Face config.json, plus presets.

Field names follow the Hugging Face config.json keys so that a checkpoint's config maps
one-to-one. Presets carry the published architecture numbers of common checkpoints and are used
for memory planning (no weights are needed to plan).
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from minift.files import read_json

# Where the config being built came from, for error messages: `from_hf_dict` sets it around the
# constructor so that the checks in __post_init__ name the config.json, not just "config".
_SOURCE = contextvars.ContextVar("minift_config_source", default="config")

# rope_scaling keys each scaling type needs (the model divides or interpolates with them).
# yarn's original_max_position_embeddings defaults to max_position_embeddings, as in transformers
# (Qwen2.5's long-context recipe writes it; a config that leaves it out means "no stretch yet").
ROPE_REQUIRED_KEYS = {"linear": ("factor",),
                      "dynamic": ("factor",),
                      "yarn": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}
# optional rope_scaling keys checked when present and not null: key -> (check, what it must be)
_ROPE_OPTIONAL_KEYS = {
    "original_max_position_embeddings": (lambda v: _positive_int(v), "a positive integer"),
    "attention_factor": (lambda v: _positive_number(v), "a finite number > 0"),
    "beta_fast": (lambda v: _positive_number(v), "a finite number > 0"),
    "beta_slow": (lambda v: _positive_number(v), "a finite number > 0"),
    "mscale": (lambda v: _finite_number(v), "a finite number"),
    "mscale_all_dim": (lambda v: _finite_number(v), "a finite number"),
    "truncate": (lambda v: isinstance(v, bool), "true or false"),
}

# config.json "model_type" values we implement, and the "architectures" entry we write back.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None -> same as num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # e.g. Llama 3.1/3.2 {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has a bias on q/k/v (not on o)
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral v0.1; only matters past this many tokens
    model_type: str = "llama"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Any] = 2  # int or list of ints (Llama 3.1 lists several)
    pad_token_id: Optional[int] = None
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, written back unchanged

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Derive head_dim only from valid numbers; otherwise validate() names the bad field
        # (hidden_size or num_attention_heads) instead of a TypeError escaping from here.
        if self.head_dim is None and _positive_int(self.hidden_size) \
                and _positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate(_SOURCE.get())

    def validate(self, source: str = "config") -> None:
        """Raise ValueError naming `source` and the field when a value cannot describe a model
        (wrong type included: config.json may hold "1e-5" as a string)."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unknown model_type {self.model_type!r}; supported: "
                             f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _positive_number(value):
                raise ValueError(f"{source}: field {name!r} must be a finite number > 0, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{source}: field {name!r} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        if self.torch_dtype not in FLOAT_DTYPE_NAMES:
            raise ValueError(f"{source}: field 'torch_dtype' (or 'dtype') must name a floating dtype "
                             f"({', '.join(FLOAT_DTYPE_NAMES)}), got {self.torch_dtype!r}")
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise ValueError(f"{source}: field 'sliding_window' must be a positive integer or null, "
                             f"got {self.sliding_window!r}")
        self._validate_token_ids(source)
        self._validate_rope_scaling(source)

    def _validate_token_ids(self, source: str) -> None:
        # generation and the merged model's config.json copy these as they are: a string or a
        # float here would be written back out, or compared with token ids and never match
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            several = name == "eos_token_id" and isinstance(value, list)
            ids = value if several else [value]
            # old Llama configs write pad_token_id -1 (no padding token): any integer is kept
            ok = (lambda t: _token_id(t, -1 if name == "pad_token_id" else 0))
            if value is None or (ids and all(map(ok, ids))):
                continue
            what = "an integer token id" + (", a non-empty list of them" if name == "eos_token_id"
                                            else "")
            raise ValueError(f"{source}: field {name!r} must be {what} or null, got {value!r}")

    def _validate_rope_scaling(self, source: str) -> None:
        # Only the shape is checked here: whether the model implements a rope_type is the model's
        # business (memory planning reads configs whose scaling minift cannot run).
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ValueError(f"{source}: field 'rope_scaling' must be an object or null, got {scaling!r}")
        rope_type = _rope_type(scaling)
        keys = ROPE_REQUIRED_KEYS.get(rope_type, ())
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise ValueError(f"{source}: field 'rope_scaling' (rope_type {rope_type!r}) is missing "
                             f"{', '.join(missing)}")
        for k in keys:
            if not _positive_number(scaling[k]):
                raise ValueError(f"{source}: field 'rope_scaling' (rope_type {rope_type!r}): {k!r} "
                                 f"must be a finite number > 0, got {scaling[k]!r}")
        for k, (ok, what) in _ROPE_OPTIONAL_KEYS.items():
            if k not in keys and scaling.get(k) is not None and not ok(scaling[k]):
                raise ValueError(f"{source}: field 'rope_scaling' (rope_type {rope_type!r}): {k!r} "
                                 f"must be {what}, got {scaling[k]!r}")

    # ---- parameter counts (used by memory planning) -------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer, by HF name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def num_parameters(self) -> int:
        """Total parameters, counting a tied embedding once."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.mlp_bias:
            per_layer += 2 * self.intermediate_size + self.hidden_size
        per_layer += 2 * self.hidden_size  # two RMSNorm weights
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_hidden_layers * per_layer + embed + head + self.hidden_size

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json; errors name `source` and the key."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(architectures={d.get('architectures')!r}); supported model types: "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        for key in required:
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        d = _legacy_rope_fields(d)
        kwargs = {k: v for k, v in d.items() if k in names}
        if model_type == "qwen2" and "attention_bias" not in d:
            kwargs["attention_bias"] = True  # Qwen2 always has q/k/v biases
        kwargs["extra"] = {k: v for k, v in d.items()
                           if k not in names and k not in ("architectures", "dtype")}
        dtype = _declared_dtype(d, source)
        if dtype is None:
            kwargs.pop("torch_dtype", None)
        else:
            kwargs["torch_dtype"] = dtype
        token = _SOURCE.set(source)
        try:
            return cls(**kwargs)
        finally:
            _SOURCE.reset(token)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        d = read_json(path, expect=dict)
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        if self.sliding_window is None:
            d.pop("sliding_window")
        d.update(self.extra)
        d["architectures"] = [SUPPORTED_MODEL_TYPES[self.model_type]]
        d["dtype"] = d["torch_dtype"]  # transformers 5 reads "dtype", earlier releases "torch_dtype"
        return d

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A preset by name (see PRESETS); the error lists the known names."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


LlamaConfig = ModelConfig

# what config.json's torch_dtype / dtype may say (Hugging Face writes these names)
FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def _declared_dtype(d: dict, source: str) -> Optional[str]:
    """The weights' dtype a config.json declares: "dtype" (transformers 5 writes only this one)
    or "torch_dtype" (earlier releases); None when it declares none. Both, disagreeing, is an
    error rather than a guess: one of them would decide the saved model's precision."""
    found = {k: d[k] for k in ("dtype", "torch_dtype") if isinstance(d.get(k), str)}
    names = {str(v).removeprefix("torch.") for v in found.values()}
    if len(names) > 1:
        raise ValueError(f"{source}: 'dtype' ({found['dtype']!r}) and 'torch_dtype' "
                         f"({found['torch_dtype']!r}) disagree; keep one")
    return names.pop() if names else None


def _token_id(value, lowest: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rope_type(config: ModelConfig) -> str:
    """The config's RoPE family: rope_scaling's "rope_type" (or the older "type"), else "default"."""
    return _rope_type(config.rope_scaling or {})


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _legacy_rope_fields(d: dict) -> dict:
    """Map a `rope_parameters` block (transformers >= 5 writes it) onto rope_theta/rope_scaling."""
    params = d.get("rope_parameters")
    if not isinstance(params, dict):
        return d
    d = {k: v for k, v in d.items() if k != "rope_parameters"}
    if "rope_theta" in params:
        d["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if _rope_type(scaling) != "default":
        d["rope_scaling"] = scaling
    return d

_LLAMA3_ROPE_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Published architecture numbers of each checkpoint's config.json.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       bos_token_id=128000, eos_token_id=128001),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE_32, factor=8.0), tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE_32),
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE_32),
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096),
    "mistral-7b-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, max_position_embeddings=32768,
                            rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
                            bos_token_id=1, eos_token_id=2),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, attention_bias=True, sliding_window=131072,
                       bos_token_id=151643, eos_token_id=151643),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, attention_bias=True, bos_token_id=151643,
                     eos_token_id=151643),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643),
}
