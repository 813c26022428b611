"""NF4Linear: equals nn.Linear on the dequantized weight, saves no float weight, QLoRA trains."""
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import minift
from minift.nf4.linear import NF4Linear, NF4MatMul, quantize_model
from minift.nf4.quantize import dequantize_nf4, quantize_nf4


def _pair(out_f=24, in_f=40, dtype=torch.float32, bias=True):
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    q = NF4Linear.from_linear(base)
    ref = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize(dtype))
        if bias:
            ref.bias.copy_(base.bias)
    return q, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_equal_linear_on_dequantized_weight(dtype):
    q, ref = _pair(dtype=dtype)
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    y = q(x)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    y_ref = ref(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
    assert y.dtype == dtype and gx.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
    if dtype == torch.float32:  # same kernels, same inputs: bit-equal on CPU
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_nothing_trainable_and_weight_is_buffers():
    q, _ = _pair()
    assert [p.requires_grad for p in q.parameters()] == [False]  # only the frozen bias
    names = dict(q.named_buffers())
    assert names["weight"].dtype == torch.uint8 and names["weight"].shape == (24 * 40 // 2, 1)
    assert (q.in_features, q.out_features) == (40, 24)


def test_saved_tensors_hold_no_dequantized_weight():
    q, _ = _pair(out_f=48, in_f=64)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "the Function saves the quantized tensors"
    assert all(not (shape == (48, 64) and dtype.is_floating_point) for shape, dtype in saved)
    assert ((48 * 64 // 2, 1), torch.uint8) in saved  # it is the packed weight that is kept
    assert x.grad is not None and x.grad.shape == (4, 64)


# what NF4MatMul's ctx may hold besides save_for_backward: plain metadata, never a tensor
PLAIN = (int, float, type(None), torch.dtype, torch.Size)


@pytest.mark.parametrize("double_quant", [True, False])
def test_ctx_holds_plain_metadata_and_saves_only_the_quantized_tensors(double_quant):
    q = NF4Linear.from_weight(torch.randn(48, 64), double_quant=double_quant)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    attrs = vars(y.grad_fn)  # what forward set on ctx
    assert {"shape", "blocksize", "offset", "compute_dtype"} <= attrs.keys()
    assert all(isinstance(v, PLAIN) for v in attrs.values()), attrs
    assert (attrs["offset"] is None) is not double_quant
    # exactly the weight's quantized tensors went through save_for_backward, in this order
    expected = q.quant_weight.tensors()
    assert [(t.data_ptr(), t.shape, t.dtype) for t in saved] == \
        [(t.data_ptr(), t.shape, t.dtype) for t in expected]
    assert len(saved) == (5 if double_quant else 3)


@pytest.mark.parametrize("double_quant", [True, False])
def test_backward_needs_nothing_but_the_saved_tensors(double_quant):
    # Saved-tensor hooks that move what is saved elsewhere (here: copies, as CPU offloading
    # does) must leave nothing else holding the weight: once the caller drops it, its packed
    # nibbles and absmax are freed, and backward rebuilds it from the copies alone.
    w = torch.randn(40, 72)
    x = torch.randn(3, 72, requires_grad=True)
    weight = quantize_nf4(w, double_quant=double_quant)
    ref = torch.nn.functional.linear(x, dequantize_nf4(weight, torch.float32))
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    alive = [weakref.ref(t) for t in (weight.packed, weight.absmax, weight.nested_absmax)
             if t is not None]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        y = NF4MatMul.apply(x, weight, None, torch.float32)
    del weight
    gc.collect()
    assert [r() for r in alive] == [None] * len(alive)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, ref) and torch.equal(g, g_ref)


def test_cpu_autocast_bf16():
    q, ref = _pair()
    x = torch.randn(3, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, None])
def test_autocast_respects_explicit_compute_dtype(compute_dtype):
    base = nn.Linear(40, 24)
    q = NF4Linear.from_linear(base, compute_dtype=compute_dtype)
    dtype = compute_dtype or torch.bfloat16  # None: the autocast dtype
    w = q.dequantize(dtype)
    x = torch.randn(3, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        g = torch.randn(3, 24, dtype=y.dtype)
        (gx,) = torch.autograd.grad(y, x, g)  # backward under autocast as well
    assert y.dtype == dtype and gx.dtype == torch.float32
    # the same ops in the chosen dtype with autocast off: bit-equal
    expected = nn.functional.linear(x.detach().to(dtype), w, base.bias.detach().to(dtype))
    assert torch.equal(y, expected)
    assert torch.equal(gx, (g.to(dtype) @ w).float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    q, ref = _pair()
    x = torch.ones(2, 40, dtype=dtype)
    with pytest.raises(RuntimeError):
        ref(x)  # nn.Linear refuses it as well
    with pytest.raises(TypeError, match=f"NF4Linear: input must be a floating-point tensor, got dtype {dtype}"):
        q(x)


def test_under_non_reentrant_checkpoint():
    q, _ = _pair()
    x = torch.randn(3, 40, requires_grad=True)
    (g_plain,) = torch.autograd.grad(q(x).pow(2).sum(), x)
    y = checkpoint(lambda t: q(t).pow(2), x, use_reentrant=False)
    (g_ckpt,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g_plain, g_ckpt)


def test_to_moves_buffers_and_dequantize_dtype():
    q, _ = _pair()
    moved = q.to("cpu")
    assert moved.weight.device.type == "cpu"
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), dequantize_nf4(q.quant_weight))


CONVERSIONS = {
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "to_device_and_fp16": lambda m: m.to("cpu", torch.float16),
    "type_fp16": lambda m: m.type(torch.float16),  # reaches the uint8 buffers too
}
QUANT_BUFFERS = ("weight", "weight_absmax", "weight_quant_map", "weight_nested_absmax",
                 "weight_nested_quant_map")


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("convert", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_dtype_conversion_leaves_quantization_untouched(convert, double_quant):
    layer = NF4Linear.from_linear(nn.Linear(40, 24), blocksize=32, double_quant=double_quant)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    deq = layer.dequantize(torch.float32)
    buffers = {n: (b.dtype, b.clone()) for n, b in layer.named_buffers() if b is not None}
    assert convert(layer) is layer
    assert torch.equal(layer.dequantize(torch.float32), deq)
    for name, (dtype, value) in buffers.items():
        now = getattr(layer, name)
        assert now.dtype == dtype and torch.equal(now, value), name
    after = layer.state_dict()
    assert list(after) == list(before)
    for key in before:
        if key == "bias":  # an ordinary parameter: it follows the conversion
            assert after[key].dtype != torch.float32
            assert torch.equal(after[key], before[key].to(after[key].dtype))
        else:
            assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    x = torch.randn(3, 40, dtype=torch.float16)
    expected = nn.functional.linear(x, deq.half(), layer.bias.half())
    assert torch.equal(layer(x), expected)


def test_model_to_bf16_keeps_nf4_layers_and_converts_the_rest():
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    quantize_model(model, skip=("2",))
    minift.lora_wrap(model, r=2, target_modules=["0"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deq = model[0].base_layer.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert torch.equal(model[0].base_layer.dequantize(torch.float32), deq)
    after = model.state_dict()
    for key, value in before.items():
        quantized = key.startswith("0.base_layer.weight")
        assert after[key].dtype == (value.dtype if quantized else torch.bfloat16), key
        assert torch.equal(after[key], value.to(after[key].dtype)), key
    assert model[0].base_layer.weight_quant_map.dtype == torch.float32
    assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- state dicts


def test_state_dict_keys_and_values_equal_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    w, b = torch.randn(16, 72, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    lin = bnb.nn.Linear4bit(72, 16, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin.bias = nn.Parameter(b.clone(), requires_grad=False)
    theirs = lin.to("cpu").state_dict()
    ours = NF4Linear.from_weight(w, b).state_dict()
    assert list(ours) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"]
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    loaded = NF4Linear.from_bnb_state_dict(theirs, "")
    assert torch.equal(loaded.dequantize(), dequantize_nf4(quantize_nf4(w)))
    assert torch.equal(loaded.bias, b)


def test_load_state_dict_round_trip_inside_a_model():
    src = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 6))
    quantize_model(src, skip=())
    dst = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 6))
    quantize_model(dst, skip=())
    result = dst.load_state_dict(src.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 10)
    assert torch.equal(dst(x), src(x))


def test_load_state_dict_names_missing_and_unknown_keys():
    layer, _ = _pair()
    sd = layer.state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match=r"weight\.absmax"):
        layer.load_state_dict(sd)
    sd = layer.state_dict()
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(RuntimeError, match="fp4"):
        layer.load_state_dict(sd)
    sd = layer.state_dict()
    sd["weight.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"weight\.extra"):
        layer.load_state_dict(sd)


def test_bad_constructor_arguments():
    q = quantize_nf4(torch.randn(4, 8))
    with pytest.raises(TypeError, match="NF4Weight"):
        NF4Linear(torch.randn(4, 8))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(quantize_nf4(torch.randn(4, 8, 2)))
    with pytest.raises(ValueError, match="bias has shape"):
        NF4Linear(q, bias=torch.zeros(5))
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear(q, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))


# ------------------------------------------------------------------ quantize_model + QLoRA


def _tiny_llama(bias=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg)


NESTED_CODE_BYTES = 4 * 256  # the fp32 256-entry dynamic map


def _nf4_bytes(out_f, in_f, blocksize=64):
    """Bytes of a double-quantized NF4 (out, in) weight, from the format: packed nibbles, 8-bit
    absmax codes, fp32 nested scales, the 16-entry fp32 NF4 code and the nested code book."""
    n = out_f * in_f
    n_blocks = -(-n // blocksize)
    return -(-n // 2) + n_blocks + 4 * -(-n_blocks // 256) + 4 * 16 + NESTED_CODE_BYTES


def test_quantize_model_replaces_linears_and_reports_bytes():
    model = _tiny_llama(bias=True)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"}
    biases = {name: m.bias for name, m in linears.items()}
    # no tied or shared tensors in this model, so plain sums are the unique bytes
    bytes_before = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    bytes_after = bytes_before + sum(_nf4_bytes(*m.weight.shape) - m.weight.nbytes for m in linears.values())
    # quantized on the CPU, every layer's nested code book is one shared tensor, counted once
    bytes_after -= (len(linears) - 1) * NESTED_CODE_BYTES
    del linears
    returned = quantize_model(model, blocksize=64)
    assert returned is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear  # skipped by default
    assert kinds["model.layers.0.self_attn.q_proj"] is NF4Linear
    assert sorted(n for n, k in kinds.items() if k is NF4Linear) == sorted(biases)
    for name, bias in biases.items():
        layer = model.get_submodule(name)
        assert layer.bias is not None and not layer.bias.requires_grad, name
        assert torch.equal(layer.bias, bias), name
        assert sum(t.nbytes for t in layer.quant_weight.tensors()) == _nf4_bytes(*layer.quant_weight.shape)
    nested_codes = {model.get_submodule(name).weight_nested_quant_map.data_ptr() for name in biases}
    assert len(nested_codes) == 1
    assert model._minift_quant_report == {"bytes_before": bytes_before, "bytes_after": bytes_after,
                                          "layers": len(biases)}


def test_quantize_model_frees_each_weight_as_it_goes(monkeypatch):
    model = _three_layers()
    originals = [weakref.ref(m.weight) for m in model.modules() if type(m) is nn.Linear]
    dead_at_each_call = []
    from_linear = NF4Linear.from_linear.__func__

    def counting(cls, linear, *args, **kwargs):
        dead_at_each_call.append(sum(ref() is None for ref in originals))
        return from_linear(cls, linear, *args, **kwargs)

    monkeypatch.setattr(NF4Linear, "from_linear", classmethod(counting))
    quantize_model(model, skip=())
    # converting layer k starts with exactly the k layers before it gone: each full-precision
    # weight is released right after its replacement, not all together at the end
    assert dead_at_each_call == [0, 1, 2]
    assert all(ref() is None for ref in originals)


def _three_layers():
    return nn.Sequential(nn.Linear(8, 8), nn.ModuleDict({"fc": nn.Linear(8, 8)}), nn.Linear(8, 4))


def _spoil_nan(layer):
    with torch.no_grad():
        layer.weight[1, 2] = float("nan")


def _spoil_inf(layer):
    with torch.no_grad():
        layer.weight[0, 0] = -float("inf")


def _spoil_empty(layer):
    layer.weight = nn.Parameter(torch.empty(8, 0))


def _spoil_int(layer):
    layer.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int32), requires_grad=False)


def _spoil_float64(layer):
    layer.weight = nn.Parameter(layer.weight.detach().double())


@pytest.mark.parametrize("spoil, error, match", [
    (_spoil_nan, ValueError, r"layer '1\.fc' weight holds 1 NaN/Inf"),
    (_spoil_inf, ValueError, r"layer '1\.fc' weight holds 1 NaN/Inf"),
    (_spoil_empty, ValueError, r"layer '1\.fc' weight is empty \(shape \(8, 0\)\)"),
    (_spoil_int, TypeError, r"layer '1\.fc' weight must be float32, bfloat16 or float16, got dtype torch\.int32"),
    (_spoil_float64, TypeError, r"layer '1\.fc' weight .* got dtype torch\.float64"),
])
def test_quantize_model_checks_every_layer_before_converting(spoil, error, match):
    model = _three_layers()
    spoil(model[1]["fc"])  # the second of three targets: the first would be converted already
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(error, match="quantize_model: " + match):
        quantize_model(model, skip=())
    assert [type(m) for m in model.modules()] == [type(m) for m in _three_layers().modules()]
    assert all(model.get_parameter(n) is p for n, p in params.items())  # the very same tensors
    assert not hasattr(model, "_minift_quant_report")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(blocksize=48), ValueError, "unsupported blocksize 48"),
    (dict(blocksize=64.0), TypeError, r"blocksize must be an int, got 64\.0"),
    (dict(compute_dtype=torch.int8), TypeError, "compute_dtype must be .* got torch.int8"),
])
def test_quantize_model_bad_settings_leave_model_unchanged(kwargs, error, match):
    model = _three_layers()
    with pytest.raises(error, match="quantize_model: " + match):
        quantize_model(model, skip=(), **kwargs)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_qlora_tiny_llama_trains_and_merges():
    model = _tiny_llama()
    quantize_model(model)
    minift.lora_wrap(model, r=8, alpha=16)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 64, (2, 16))
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    # merged NF4 bases are bf16 nn.Linear layers; run both sides under the same bf16 autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
        minift.merge_lora(model)
        after = model(input_ids=ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before.float(), rtol=0.1, atol=0.1)
