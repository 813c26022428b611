"""save_model(..., quantization="nf4"): bitsandbytes' 4-bit checkpoint, checked against
minift's own loader, transformers + bitsandbytes (CPU) and bitsandbytes' quantizer and dequantizer.

Every linear here has an input width that is a multiple of 64: bitsandbytes 0.50's CPU
inference path repacks weights in rows of whole 64-element blocks and fails on other widths, and
its native CPU dequantizer picks wrong block scales when the last dimension is not a multiple of
the blocksize (tests/oracles.py). The format itself has no such limit (minift's loader reads any
shape; tests/test_nf4.py).
"""
import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_model import BASE, FAMILIES

import minift
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.bnb_format import BNB_SUFFIXES
from minift.nf4.fsdp import shardable_nf4
from minift.nf4.linear import NF4Linear, quantize_model
from minift.nf4.quantize import dequantize_nf4

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


@pytest.fixture(autouse=True)
def _no_compile():
    # bitsandbytes' generic CPU dequantizer is torch.compile'd; eager gives the same numbers faster
    with torch.compiler.set_stance("force_eager"):
        yield


def float_model(family, dtype=torch.float32):
    """A small random model of ``family`` whose linear inputs are 64 or 128 wide."""
    torch.manual_seed(0)
    cls, kw = FAMILIES[family]
    config = cls(**{**BASE, "intermediate_size": 128}, **kw, initializer_range=0.3)
    model = Llama(ModelConfig.from_hf_dict(config.to_dict()))
    return model.to(dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def nf4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


@pytest.mark.parametrize("family,dtype,shard,double", [("qwen2", torch.float32, "40KB", True),
                                                       ("llama3.2", torch.bfloat16, "5GB", True),
                                                       ("llama2", torch.float32, "5GB", False)])
def test_round_trip_is_bit_equal(tmp_path, family, dtype, shard, double):
    model = quantize_model(float_model(family, dtype), double_quant=double)
    minift.save_model(model, tmp_path, max_shard_size=shard, quantization="nf4")
    if shard != "5GB":
        assert (tmp_path / "model.safetensors.index.json").exists()  # pieces spread over shards
    back = minift.load_model(tmp_path, dtype=dtype)
    ours, theirs = nf4_layers(model), nf4_layers(back)
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, layer in ours.items():
        a, b = layer.quant_weight, theirs[name].quant_weight
        assert (a.shape, a.dtype, a.blocksize, a.offset, a.nested_blocksize) == \
               (b.shape, b.dtype, b.blocksize, b.offset, b.nested_blocksize), name
        for x, y in zip(a.tensors(), b.tensors()):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        if layer.bias is not None:
            assert torch.equal(layer.bias, theirs[name].bias)
    for name, p in model.named_parameters():
        assert torch.equal(p, back.get_parameter(name)), name
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(logits(model, ids), logits(back, ids))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == str(dtype).removeprefix("torch.")
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] == double


@pytest.mark.parametrize("family,blocksize,double", [("qwen2", 64, True), ("llama3.2", 64, True),
                                                     ("llama2", 32, False)])
def test_transformers_and_bitsandbytes_read_the_checkpoint(tmp_path, family, blocksize, double):
    float32 = float_model(family)
    model = quantize_model(copy.deepcopy(float32), blocksize=blocksize, double_quant=double,
                           compute_dtype=torch.float32)
    minift.save_model(model, tmp_path, quantization="nf4")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head"] and config["bnb_4bit_use_double_quant"] == double

    saved = load_file(tmp_path / "model.safetensors")
    for name, layer in nf4_layers(model).items():
        key = f"{name}.weight"
        pieces = {s: saved[f"{key}.{s}"] for s in BNB_SUFFIXES if double or not s.startswith("nested")}
        assert sum(k.startswith(f"{key}.") for k in saved) == len(pieces)
        state = F.QuantState.from_dict(dict(pieces), device="cpu")
        # bitsandbytes' own dequantizer reads our bytes as minift does, bit for bit
        assert torch.equal(F.dequantize_4bit(saved[key], state), dequantize_nf4(layer.quant_weight)), key
        # and its quantizer writes the same tensors from the same float weight
        packed, theirs = F.quantize_4bit(float32.get_parameter(key), blocksize=blocksize, quant_type="nf4",
                                         compress_statistics=double)
        assert torch.equal(packed, saved[key]), key
        for suffix, t in theirs.as_dict(packed=True).items():
            assert t.dtype == pieces[suffix].dtype and torch.equal(t, pieces[suffix]), (key, suffix)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu")
    kinds = {n: type(m).__name__ for n, m in hf.named_modules() if n.endswith("proj") or n == "lm_head"}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"Linear4bit"}
    for m in hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs bitsandbytes 0.50 repacks the weight for a kernel that multiplies
            # in bfloat16 (logits 0.19 off here); the generic path computes in the float32 asked for.
            m.support_avx512bf16_for_cpu = False
            assert m.compute_dtype == torch.float32
    for shape in [(2, 9), (1, 1)]:  # a batch, and one token (bitsandbytes' vector path)
        ids = torch.randint(0, 128, shape)
        assert (logits(hf, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_float_model_is_quantized_as_quantize_model_does(tmp_path):
    model = float_model("qwen2", torch.bfloat16)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    minift.save_model(model, tmp_path / "float", quantization="nf4")
    assert not nf4_layers(model)  # the model itself is left as it was
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    minift.save_model(quantize_model(copy.deepcopy(model)), tmp_path / "nf4", quantization="nf4")
    a, b = load_file(tmp_path / "float" / "model.safetensors"), load_file(tmp_path / "nf4" / "model.safetensors")
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "float" / name).read_text() == (tmp_path / "nf4" / name).read_text()


def test_partly_quantized_model_quantizes_the_rest(tmp_path):
    # what merging a QLoRA adapter on a few layers leaves: float q_proj next to NF4 layers
    model = quantize_model(float_model("qwen2"), skip=("lm_head", "q_proj"))
    minift.save_model(model, tmp_path, quantization="nf4")
    back = minift.load_model(tmp_path, dtype=torch.float32)
    assert len(nf4_layers(back)) == 14 and type(back.lm_head) is torch.nn.Linear
    whole = quantize_model(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(logits(back, ids), logits(whole, ids))


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_bad_arguments_and_layers_are_one_line_errors(tmp_path):
    model = quantize_model(float_model("llama3.2"))
    one_line_error(lambda: minift.save_model(model, tmp_path, quantization="int8"),
                   r"quantization must be None or 'nf4', got 'int8'")
    one_line_error(lambda: minift.save_model(model, tmp_path),
                   r"NF4-quantized weights .*pass quantization='nf4'")
    wrapped = minift.lora_wrap(copy.deepcopy(model), r=4)
    one_line_error(lambda: minift.save_model(wrapped, tmp_path, quantization="nf4"),
                   r"LoRA adapters .*minift.merge_lora\(model\) first")
    sharded = copy.deepcopy(model)
    shardable_nf4(sharded)
    one_line_error(lambda: minift.save_model(sharded, tmp_path, quantization="nf4"),
                   r"layer 'model.layers.0.self_attn.q_proj' is a ShardedNF4Linear .*to_nf4_linear")
    odd = copy.deepcopy(model)
    odd.model.layers[1].mlp.down_proj = torch.nn.Module()
    odd.model.layers[1].mlp.down_proj.register_buffer("weight", torch.zeros(64, 128, dtype=torch.int8))
    one_line_error(lambda: minift.save_model(odd, tmp_path, quantization="nf4"),
                   r"layer 'model.layers.1.mlp.down_proj' is a Module holding a non-float weight")
    nan = float_model("llama3.2")
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    one_line_error(lambda: minift.save_model(nan, tmp_path, quantization="nf4"),
                   r"save_model: layer 'model.layers.0.mlp.up_proj' weight holds 1 NaN")
    assert not (tmp_path / "config.json").exists()  # nothing was written by any of them
