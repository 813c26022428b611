"""RoPE scaling families (minift/models/rope.py) against transformers' LlamaForCausalLM.

Every family runs a tiny random model whose original length L is 16 tokens at positions
0 .. 4L - 1, in one forward call and token by token through the KV cache, against transformers
with the same weights (float32, max abs logit difference <= 1e-5). Each scaled family is also
checked to change the logits past L, so an oracle that ignored rope_scaling could not pass.
"""
import copy

import pytest
import torch

import minift
from minift.models.config import ModelConfig
from minift.models.llama import KVCache, Llama
from minift.models.rope import (
    SUPPORTED_ROPE_TYPES,
    original_length,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is much faster

L = 16  # the original (pre-training) length of the test models; positions run to 4L
VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
# family -> (transformers config class, rope_scaling, more config fields)
CASES = {
    "default": (transformers.LlamaConfig, None, {}),
    "linear": (transformers.LlamaConfig, {"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": (transformers.LlamaConfig, {"rope_type": "dynamic", "factor": 4.0}, {}),
    "yarn": (transformers.LlamaConfig, YARN, {}),
    # extend_context's form: the new length in max_position_embeddings
    "yarn-extended": (transformers.LlamaConfig, dict(YARN), {"max_position_embeddings": 4 * L}),
    # Qwen2.5's long-context recipe: the legacy "type" key, max_position_embeddings unchanged
    "yarn-qwen2.5": (transformers.Qwen2Config,
                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
                     {"rope_theta": 1000000.0}),
    "yarn-tuned": (transformers.LlamaConfig,
                   dict(YARN, beta_fast=16, beta_slow=2, attention_factor=1.3), {}),
    "yarn-mscale": (transformers.LlamaConfig,
                    dict(YARN, mscale=0.707, mscale_all_dim=1.0, truncate=False), {}),
    "yarn-no-original": (transformers.LlamaConfig, {"rope_type": "yarn", "factor": 2.0}, {}),
    "llama3": (transformers.LlamaConfig,
               {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": L}, {"max_position_embeddings": 4 * L}),
}
LENGTHS = (L // 2, L, L + 1, 2 * L + 3, 4 * L)


def hf_model(case, std=None):
    cls, scaling, more = CASES[case]
    kw = dict(BASE, **more)
    if scaling is not None:
        kw["rope_scaling"] = copy.deepcopy(scaling)
    if std is not None:
        kw["initializer_range"] = std
    return transformers.AutoModelForCausalLM.from_config(cls(**kw, attn_implementation="sdpa")).eval()


def minift_from_hf(hf, rope_scaling="same"):
    config = ModelConfig.from_hf_dict(hf.config.to_dict())  # transformers 5 writes rope_parameters
    if rope_scaling != "same":
        config.rope_scaling = rope_scaling
    model = Llama(config)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.eval()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_up_to_four_times_the_original_length(case):
    hf = hf_model(case)
    model = minift_from_hf(hf)
    plain = minift_from_hf(hf, rope_scaling=None)
    for t in LENGTHS:
        ids = torch.randint(0, VOCAB, (2, t))
        fresh = copy.deepcopy(hf)  # transformers' dynamic RoPE keeps state between calls
        with torch.no_grad():
            ours, theirs, unscaled = model(ids), fresh(ids).logits, plain(ids)
        assert max_diff(ours, theirs) <= 1e-5, (case, t)
        if case == "dynamic" and t <= L:  # NTK scaling starts past the original length
            assert torch.equal(ours, unscaled)
        elif case != "default" and t == 4 * L:  # the scaling is in effect: the oracle was tested
            assert max_diff(ours, unscaled) > 1e-3, case


@pytest.mark.parametrize("case", ["dynamic", "yarn", "linear"])
def test_positions_given_explicitly_match_transformers(case):
    # a window of late positions only: dynamic's length comes from the largest position id
    hf = hf_model(case)
    model = minift_from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 12))
    pos = torch.arange(3 * L, 3 * L + 12).expand(2, 12)
    with torch.no_grad():
        assert max_diff(model(ids, position_ids=pos), hf(ids, position_ids=pos).logits) <= 1e-5


# one case per code path (the yarn variants differ in their tables, checked above)
@pytest.mark.parametrize("case", ["default", "linear", "dynamic", "yarn-tuned", "yarn-qwen2.5",
                                  "llama3"])
def test_kv_cache_decoding_matches_transformers_cache(case):
    # a 10-token prompt, then one token at a time to position 4L - 1: dynamic recomputes its
    # frequencies at every step past L in both
    hf = hf_model(case, std=0.3)
    model = minift_from_hf(hf)
    ids = torch.randint(0, VOCAB, (1, 10))
    cache = KVCache(BASE["num_hidden_layers"])
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        worst = max_diff(model(ids, kv_cache=cache), out.logits)
        token = out.logits[:, -1:].argmax(-1)
        while cache.length < 4 * L:
            out = hf(token, past_key_values=out.past_key_values, use_cache=True)
            worst = max(worst, max_diff(model(token, kv_cache=cache), out.logits))
            token = out.logits[:, -1:].argmax(-1)
    assert cache.length == 4 * L
    assert worst <= 1e-5, case


@pytest.mark.parametrize("case", ["dynamic", "yarn-qwen2.5"])
def test_generate_gives_transformers_tokens_past_the_original_length(case):
    hf = hf_model(case, std=0.3)
    model = minift_from_hf(hf)
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: rows of 12, 8 and 10 tokens
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    new = 3 * L
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    ours = minift.generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    assert ours.shape == (3, 12 + new)
    assert torch.equal(ours, theirs)
    assert all(len(set(row[12:].tolist())) >= 8 for row in ours)  # varied continuations


def test_dynamic_depends_on_the_call_only():
    # transformers keeps the frequencies of its longest call until one shorter than L; minift's
    # call after a longer one equals transformers' fresh model (the state-free reading)
    hf = hf_model("dynamic")
    model = minift_from_hf(hf)
    long_ids, ids = torch.randint(0, VOCAB, (1, 4 * L)), torch.randint(0, VOCAB, (1, 2 * L))
    with torch.no_grad():
        model(long_ids)
        after_long = model(ids)
        assert max_diff(after_long, copy.deepcopy(hf)(ids).logits) <= 1e-5
        assert torch.equal(after_long, minift_from_hf(hf)(ids))


def test_yarn_attention_factor_scales_the_tables():
    config = ModelConfig(**BASE, rope_scaling=dict(YARN))
    factor = rope_attention_factor(config)
    assert factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    config.rope_scaling = dict(YARN, attention_factor=1.25)
    assert rope_attention_factor(config) == 1.25
    config.rope_scaling = dict(YARN, mscale=2.0, mscale_all_dim=1.0)
    assert rope_attention_factor(config) == pytest.approx((0.2 * torch.log(torch.tensor(4.0)).item() + 1)
                                                          / (0.1 * torch.log(torch.tensor(4.0)).item() + 1))
    pos = torch.arange(40)[None]
    inv = rope_inv_freq(config)
    cos1, sin1 = rope_cos_sin(inv, pos, torch.float32)
    cos, sin = rope_cos_sin(inv, pos, torch.float32, attention_factor=1.25)
    torch.testing.assert_close(cos, cos1 * 1.25, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin1 * 1.25, rtol=0, atol=0)


def test_yarn_keeps_fast_dimensions_and_divides_slow_ones():
    config = ModelConfig(**BASE, head_dim=64, rope_scaling=dict(YARN, original_max_position_embeddings=256))
    plain = rope_inv_freq(ModelConfig(**BASE, head_dim=64))
    scaled = rope_inv_freq(config)
    turns = 256 * plain / (2 * torch.pi)  # turns over the original length, per dimension pair
    assert torch.equal(scaled[turns > 32], plain[turns > 32])  # beta_fast: extrapolated
    torch.testing.assert_close(scaled[turns < 1], plain[turns < 1] / 4)  # beta_slow: interpolated
    between = (turns <= 32) & (turns >= 1)
    assert between.any() and (scaled[between] <= plain[between]).all()
    assert (scaled[between] >= plain[between] / 4).all()


def test_original_length_of_each_family():
    cfg = ModelConfig(**dict(BASE, max_position_embeddings=64))
    assert original_length(cfg) == 64
    cfg.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    assert original_length(cfg) == 16
    cfg.rope_scaling = {"rope_type": "dynamic", "factor": 4.0}
    assert original_length(cfg) == 64
    cfg.rope_scaling = dict(YARN)
    assert original_length(cfg) == L
    cfg.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    assert original_length(cfg) == 64
    cfg.extra["original_max_position_embeddings"] = 8  # a top-level key wins, as in transformers
    assert original_length(cfg) == 8


BAD_SCALINGS = [
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": "1.3"}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "truncate"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16.5},
     "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0, "mscale": float("nan")}, "mscale"),
    ({"rope_type": "yarn"}, "is missing factor"),
    ({"rope_type": "dynamic"}, "is missing factor"),
    ({"rope_type": "dynamic", "factor": 0}, "'factor' must be a finite number > 0"),
]


@pytest.mark.parametrize("scaling,field", BAD_SCALINGS)
def test_bad_rope_scaling_names_the_field(scaling, field):
    d = dict(BASE, model_type="llama", rope_scaling=scaling)
    with pytest.raises(ValueError, match="config.json: field 'rope_scaling'") as err:
        ModelConfig.from_hf_dict(d)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["longrope", "proportional", "su"])
def test_unknown_rope_type_is_one_line_naming_it(kind):
    config = ModelConfig(**BASE, rope_scaling={"rope_type": kind, "factor": 2.0})
    with pytest.raises(ValueError) as err:
        Llama(config)
    message = str(err.value)
    assert f"rope_type {kind!r}" in message and "\n" not in message
    assert all(t in message for t in SUPPORTED_ROPE_TYPES)


def test_partial_rotary_factor_is_refused():
    config = ModelConfig(**BASE, rope_scaling=dict(YARN, partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
        Llama(config)


def test_changing_the_config_recomputes_cached_tables():
    hf = hf_model("yarn-extended")
    model = minift_from_hf(hf, rope_scaling=None)
    ids = torch.randint(0, VOCAB, (1, 4 * L))
    with torch.no_grad():
        model(ids)  # caches the unscaled frequencies
        model.config.rope_scaling = dict(YARN)
        assert max_diff(model(ids), hf(ids).logits) <= 1e-5
    assert len(model._inv_freq) == 1  # the stale table was dropped


@pytest.mark.triton
def test_fused_kernels_apply_the_attention_factor_as_the_reference(monkeypatch):
    # The model hands the fused RoPE kernel yarn's scaled cos/sin tables; here every kernel runs
    # (in Triton's interpreter on CPU) and must give the reference path's logits and gradients.
    import minift.models.llama as llama_mod

    config = ModelConfig(**dict(BASE, num_hidden_layers=1), rope_scaling=dict(YARN))
    assert rope_attention_factor(config) > 1
    model = Llama(config)
    ids, pos = torch.randint(0, VOCAB, (1, L)), torch.arange(3 * L, 4 * L)[None]
    calls = []
    kernel = llama_mod.fused.apply_rope
    monkeypatch.setattr(llama_mod.fused, "apply_rope", lambda *a: calls.append(1) or kernel(*a))
    outs, grads = [], []
    for fused in (False, True):
        monkeypatch.setattr(llama_mod, "uses_triton", lambda t, fused=fused: fused)
        model.zero_grad()
        out = model(ids, position_ids=pos)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 1  # the fused pass took the kernel
    assert max_diff(*outs) <= 1e-5
    assert max(max_diff(grads[0][n], grads[1][n]) for n in grads[0]) <= 1e-5


# Published sizes: Qwen2.5-7B's yarn recipe, Llama-2-7B with linear and dynamic x4, a DeepSeek-like
# yarn with mscale: the tables (no model) against transformers' own functions, bit for bit.
PUBLISHED = {
    "qwen2.5-7b-yarn": ("qwen2.5-7b", {"type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}),
    "llama-2-7b-linear": ("llama-2-7b", {"rope_type": "linear", "factor": 4.0}),
    "llama-2-7b-dynamic": ("llama-2-7b", {"rope_type": "dynamic", "factor": 4.0}),
    "llama-2-7b-yarn-mscale": ("llama-2-7b", {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                              "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
                                              "original_max_position_embeddings": 4096}),
}


@pytest.mark.parametrize("case", sorted(PUBLISHED))
def test_tables_at_published_sizes_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minift.models.rope import dynamic_inv_freq

    preset, scaling = PUBLISHED[case]
    ours = ModelConfig.from_name(preset)
    ours.rope_scaling = copy.deepcopy(scaling)
    fields = {k: getattr(ours, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "head_dim", "max_position_embeddings",
                                            "rope_theta")}
    theirs = transformers.LlamaConfig(**fields, rope_scaling=copy.deepcopy(scaling))
    kind = scaling.get("rope_type", scaling.get("type"))
    inv, factor = ROPE_INIT_FUNCTIONS[kind](theirs, "cpu")
    assert torch.equal(rope_inv_freq(ours), inv)
    assert rope_attention_factor(ours) == factor
    if kind == "dynamic":  # a call 3.5x the original length
        seq_len = torch.tensor(int(3.5 * ours.max_position_embeddings))
        grown, _ = ROPE_INIT_FUNCTIONS[kind](theirs, "cpu", seq_len=seq_len)
        pos = torch.arange(int(seq_len))[None]
        assert torch.equal(dynamic_inv_freq(ours, pos, rope_inv_freq(ours)), grown)
        assert not torch.equal(grown, inv)
