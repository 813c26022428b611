import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import minift.models.llama as model_mod
from minift.models.config import ModelConfig
from minift.models.llama import KVCache, Llama, rope_inv_freq

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4)
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
# One small random config per family. The Llama 3.1-like (untied) and 3.2-like (tied, own
# head_dim) ones scale RoPE (the short original length makes the scaling change most
# frequencies); the Mistral one has a sliding window shorter than the test sequences; Qwen2 has
# q/k/v biases, and the Qwen2.5-like one ties its embeddings as the small Qwen2.5 sizes do.
FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3.1": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_theta=500000.0,
                                                rope_scaling=LLAMA3_ROPE)),
    "llama3.2": (transformers.LlamaConfig, dict(num_key_value_heads=2, head_dim=16,
                                                tie_word_embeddings=True, rope_theta=500000.0,
                                                rope_scaling=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    "qwen2.5": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                               rms_norm_eps=1e-6, rope_theta=1000000.0)),
}
# Weight init std for generation tests. At transformers' default 0.02 the logits are nearly flat
# and a tied model's greedy output repeats one token (its own embedding scores highest), which
# would leave the KV cache barely exercised; at 0.3 continuations vary (checked by the tests).
GENERATION_STD = 0.3


def hf_model(family, std=None):
    cls, kw = FAMILIES[family]
    extra = {} if std is None else {"initializer_range": std}
    config = cls(**BASE, **kw, **extra, attn_implementation="sdpa")
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def minift_from_hf(hf):
    model = Llama(ModelConfig.from_hf_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family):
    hf = hf_model(family)
    model = minift_from_hf(hf)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding in row 1
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
        padded_hf = hf(ids, attention_mask=mask).logits
        padded = model(ids, attention_mask=mask)
    assert diff <= 1e-4
    keep = mask.bool()
    assert (padded_hf[keep] - padded[keep]).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))
    # Padding changed nothing for the real tokens of the padded row.
    assert torch.allclose(padded[1, :7], model(ids[1:, :7])[0], atol=1e-5)


def test_parameter_names_are_hf_names():
    hf = hf_model("qwen2")
    model = minift_from_hf(hf)
    assert set(model.state_dict()) == set(hf.state_dict())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_tied_embeddings_share_storage():
    model = minift_from_hf(hf_model("llama3.2"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_llama3_rope_scaling_changes_low_frequencies_only():
    cfg = ModelConfig(**BASE, head_dim=16, rope_theta=500000.0)
    plain = rope_inv_freq(cfg)
    # Wavelengths 2*pi*500000**(2i/16): 6.3, 32.4, 167, ... ; cut-offs 64/4 = 16 and 64/1 = 64.
    cfg.rope_scaling = dict(LLAMA3_ROPE, original_max_position_embeddings=64)
    scaled = rope_inv_freq(cfg)
    assert scaled[0] == plain[0]  # short wavelength: untouched
    assert plain[1] / 32 < scaled[1] < plain[1]  # between the cut-offs: interpolated
    assert torch.allclose(scaled[2:], plain[2:] / 32)  # long wavelengths: divided by factor
    cfg.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    assert torch.allclose(rope_inv_freq(cfg), plain / 4)


def test_unsupported_rope_type_lists_supported():
    cfg = ModelConfig(**BASE, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type 'longrope'; supported: default, linear, dynamic, "
                                         "yarn, llama3"):
        Llama(cfg)
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    with pytest.raises(ValueError, match="is missing high_freq_factor, original_max_position_embeddings"):
        Llama(cfg)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), pad=st.integers(0, 3))
def test_packed_samples_equal_separate_runs(lengths, pad):
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny")).eval()
    samples = [torch.randint(0, 256, (n,)) for n in lengths]
    ids = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]
                    + [torch.zeros(pad, dtype=torch.long)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, segment_ids=seg, attention_mask=(seg > 0).long())
        start = 0
        for s in samples:
            alone = model(s[None])
            assert torch.allclose(packed[0, start:start + len(s)], alone[0], atol=1e-5)
            start += len(s)
    assert torch.isfinite(packed).all()  # padding rows stay finite


def test_kv_cache_steps_equal_full_forward():
    model = minift_from_hf(hf_model("mistral"))  # window 6 < 14 tokens: the cache must honour it
    ids = torch.randint(0, 128, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.model.layers))
        parts = [model(ids[:, :5], kv_cache=cache)]
        for t in range(5, 14):
            parts.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.length == 14
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_gradient_checkpointing_same_grads_and_used(monkeypatch):
    model = Llama(ModelConfig.from_name("tiny")).train()
    ids = torch.randint(0, 256, (2, 8))
    model(ids).float().logsumexp(-1).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    real = model_mod.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(model_mod, "checkpoint", counting)
    model.gradient_checkpointing = True
    model(ids).float().logsumexp(-1).mean().backward()
    assert calls == [False, False]  # one non-reentrant checkpoint per decoder layer
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert calls == []  # inference never recomputes


def test_bf16_matches_transformers_bf16():
    hf = hf_model("llama2").to(torch.bfloat16)
    model = minift_from_hf(hf).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref.float()).abs().max().item() <= 1e-2


def test_bad_shapes_name_the_argument():
    model = Llama(ModelConfig.from_name("tiny"))
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="segment_ids must have the shape of input_ids"):
        model(ids, segment_ids=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with kv_cache"):
        model(ids, segment_ids=torch.ones(2, 5, dtype=torch.long), kv_cache=KVCache(2))


@pytest.mark.triton
@pytest.mark.slow  # the three kernels interpreted, forward and backward: ~6 s
def test_fused_ops_path_equals_torch_path(monkeypatch):
    # On CUDA the model calls minift.models.fused's RMSNorm, RoPE and SwiGLU; here the same kernels run
    # in Triton's interpreter on CPU tensors (conftest), forced on through uses_triton.
    model = Llama(ModelConfig.from_name("tiny")).train()
    ids = torch.randint(0, 256, (2, 7))
    model(ids).float().logsumexp(-1).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(ids)
    model.zero_grad()
    calls = []
    for name in ("rms_norm", "apply_rope", "swiglu"):
        real = getattr(model_mod.fused, name)
        monkeypatch.setattr(model_mod.fused, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(model_mod, "uses_triton", lambda t: True)
    model(ids).float().logsumexp(-1).mean().backward()
    assert sorted(set(calls)) == ["apply_rope", "rms_norm", "swiglu"]
    assert calls.count("rms_norm") == 2 * 2 + 1  # two per layer and the final norm
    with torch.no_grad():
        assert torch.allclose(model(ids), logits, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.triton
def test_fused_rope_serves_fp32_weights_under_bf16_autocast(monkeypatch):
    # autocast gives bf16 q and k beside the fp32 cos/sin of an fp32 model: the fused RoPE used to
    # be skipped for the slow path without a word; it takes them now, and agrees with the
    # reference rounded once to bf16
    model = Llama(ModelConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids).float()
    calls = []
    real = model_mod.fused.apply_rope
    monkeypatch.setattr(model_mod.fused, "apply_rope", lambda *a: calls.append([t.dtype for t in a]) or real(*a))
    monkeypatch.setattr(model_mod, "uses_triton", lambda t: True)
    monkeypatch.setattr(model_mod.fused, "rms_norm", model_mod.fused.rms_norm_reference)
    monkeypatch.setattr(model_mod.fused, "swiglu", model_mod.fused.swiglu_reference)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).float()
    assert calls and calls[0] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
