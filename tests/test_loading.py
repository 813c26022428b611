import json
import os
import re

import pytest
import torch
import transformers
from oracles import bnb_dequantize
from safetensors.torch import load_file, save_file
from test_generation import assert_greedy_matches
from test_model import FAMILIES, GENERATION_STD, hf_model

import minift.models.loading as loading
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.loading import _Filler, load_model, quantize_in_slices, save_model
from minift.nf4.linear import NF4Linear
from minift.nf4.quantize import quantize_nf4
from minift.sizes import parse_bytes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family saved by transformers; llama2 sharded, the others in one file. Weights at the
    generation std, so that greedy continuations of the loaded models vary."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        hf = hf_model(family, std=GENERATION_STD)
        path = tmp_path_factory.mktemp(family.replace(".", ""))
        shard = "60KB" if family == "llama2" else "50MB"
        hf.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
        out[family] = (hf, path)
    return out


def logits_diff(a, b, ids):
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    la = la.logits if hasattr(la, "logits") else la
    lb = lb.logits if hasattr(lb, "logits") else lb
    return (la.float() - lb.float()).abs().max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_transformers_checkpoint(checkpoints, family):
    hf, path = checkpoints[family]
    model = load_model(path, dtype=torch.float32)
    assert not model.training
    assert all(not p.is_meta for p in model.parameters())
    assert logits_diff(model, hf, torch.randint(0, 128, (2, 11))) <= 1e-4
    if family == "llama2":
        assert (path / "model.safetensors.index.json").exists()  # the sharded path was exercised
    # The loaded model also continues prompts exactly as transformers does, 20 greedy tokens.
    assert_greedy_matches(hf, model)


def test_dtype_and_tied_head(checkpoints):
    _, path = checkpoints["llama3.2"]
    model = load_model(path)  # default bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(path / "model.safetensors")


@pytest.mark.parametrize("family", ["llama3.2", "qwen2"])
def test_save_loads_in_transformers_with_same_logits(checkpoints, tmp_path, family):
    hf, path = checkpoints[family]
    model = load_model(path, dtype=torch.float32)
    save_model(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             attn_implementation="eager")
    assert type(back).__name__ == type(hf).__name__
    assert logits_diff(model, back.eval(), torch.randint(0, 128, (2, 9))) <= 1e-4
    again = load_model(tmp_path, dtype=torch.float32)
    assert logits_diff(model, again, torch.randint(0, 128, (1, 5))) == 0.0


def test_resave_replaces_old_shards_and_leaves_no_temp_files(tmp_path):
    model = Llama(ModelConfig.from_name("tiny"))
    save_model(model, tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    save_model(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json",
                                            "model.safetensors"]
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]


def test_max_shard_size_uses_the_one_size_grammar(tmp_path):
    assert parse_bytes("5GB") == 5 * 10**9
    assert parse_bytes("200MiB") == 200 * 2**20
    assert parse_bytes("5G") == 5 * 2**30  # a bare prefix is binary, as everywhere in minift
    assert parse_bytes(1234) == 1234
    model = Llama(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="max_shard_size: cannot read '5 parsecs'"):
        save_model(model, tmp_path, max_shard_size="5 parsecs")


def test_save_refuses_lora_and_quantized_models(tmp_path):
    model = Llama(ModelConfig.from_name("tiny"))
    layer = model.model.layers[0].self_attn
    layer.lora_A = torch.nn.Linear(64, 4)  # any parameter named lora_* marks an unmerged adapter
    with pytest.raises(ValueError, match="LoRA adapters .*lora_A.*minift.merge_lora"):
        save_model(model, tmp_path)
    del layer.lora_A
    layer.q_proj = NF4Linear.from_linear(layer.q_proj)
    with pytest.raises(ValueError, match="NF4-quantized weights .*layers.0.self_attn.q_proj.weight"):
        save_model(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


# ---- errors ------------------------------------------------------------------------------


def write_tiny(path, tensors=None, config=None):
    model = Llama(ModelConfig.from_name("tiny"))
    save_model(model, path)
    if tensors is not None:
        save_file(tensors(load_file(path / "model.safetensors")), path / "model.safetensors")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config(json.loads((path / "config.json").read_text()))))
    return model


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    write_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_missing_shard_named_in_index(tmp_path):
    save_model(Llama(ModelConfig.from_name("tiny")), tmp_path, max_shard_size="30KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    os.remove(shards[1])
    with pytest.raises(FileNotFoundError, match=f"shard {shards[1].name} named in "
                                                ".*model.safetensors.index.json does not exist"):
        load_model(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
    write_tiny(tmp_path, config=lambda c: dict(c, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]))
    with pytest.raises(ValueError, match="model_type='gpt_neox'.*supported model types: llama, mistral, qwen2"):
        load_model(tmp_path)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    write_tiny(tmp_path, tensors=lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k})
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)
    write_tiny(tmp_path, tensors=lambda t: dict(t, **{"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.0.extra.weight"):
        load_model(tmp_path)
    write_tiny(tmp_path, tensors=lambda t: dict(t, **{"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.norm.weight' has shape "
                                         r"\(65,\) .* expects \(64,\)"):
        load_model(tmp_path)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    write_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: truncated or corrupt safetensors"):
        load_model(tmp_path)
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors: truncated or corrupt safetensors"):
        load_model(tmp_path)


def test_old_checkpoints_with_rope_tables_load(tmp_path):
    ref = write_tiny(tmp_path, tensors=lambda t: dict(
        t, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    model = load_model(tmp_path, dtype=torch.float32)
    assert logits_diff(model, ref.eval(), torch.randint(0, 256, (1, 6))) == 0.0


def test_non_float_tensor_is_named_with_its_dtype(tmp_path):
    write_tiny(tmp_path, tensors=lambda t: dict(t, **{"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(ValueError, match="tensor 'model.norm.weight' has dtype int64 in the checkpoint"):
        load_model(tmp_path)
    write_tiny(tmp_path, tensors=lambda t: dict(
        t, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' has dtype int32"):
        load_model(tmp_path, quantize="nf4")


def test_config_errors_name_the_config_file(tmp_path):
    write_tiny(tmp_path, config=lambda c: dict(c, rms_norm_eps="1e-5"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: field 'rms_norm_eps'"):
        load_model(tmp_path)
    write_tiny(tmp_path, config=lambda c: dict(c, rope_scaling={"rope_type": "longrope", "factor": 4.0}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: .*unsupported rope_type 'longrope'"):
        load_model(tmp_path)
    write_tiny(tmp_path, config=lambda c: dict(c, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                 "beta_fast": "32"}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: field 'rope_scaling' .*'beta_fast'"):
        load_model(tmp_path)


def test_bad_quantize_argument(tmp_path):
    with pytest.raises(ValueError, match="quantize must be None or 'nf4', got 'int8'"):
        load_model(tmp_path, quantize="int8")


# ---- NF4: quantize on load, bitsandbytes checkpoints ---------------------------------------


def bnb_roundtrip(w):
    """bitsandbytes' NF4 (double quant, blocksize 64) of w: packed tensors and the dequantized w."""
    bf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bf.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
    return packed, state, bnb_dequantize(packed, state)


def is_quantized_linear(name):
    return name.endswith("_proj.weight")


def dequantized_reference(hf):
    """A plain minift model whose linear weights went through bitsandbytes' NF4 round trip."""
    model = Llama(ModelConfig.from_hf_dict(hf.config.to_dict()))
    sd = {k: bnb_roundtrip(v)[2] if is_quantized_linear(k) else v for k, v in hf.state_dict().items()}
    model.load_state_dict(sd)
    return model.eval()


@pytest.mark.parametrize("family", ["llama3.2", "qwen2"])
def test_quantize_on_load_matches_bitsandbytes_roundtrip(checkpoints, family):
    hf, path = checkpoints[family]
    model = load_model(path, dtype=torch.float32, quantize="nf4")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("proj") or n == "lm_head"}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"NF4Linear"}
    if family == "qwen2":
        assert model.model.layers[1].self_attn.k_proj.bias is not None
    assert not any(b.requires_grad for b in model.buffers())
    ids = torch.randint(0, 128, (2, 7))
    assert logits_diff(model, dequantized_reference(hf), ids) <= 1e-4


@pytest.mark.parametrize("shape,dtype", [((300, 129), torch.bfloat16), ((64, 48), torch.float32),
                                         ((7,), torch.float16), ((2048, 33), torch.float32)])
def test_quantize_in_slices_is_quantize_nf4_bit_for_bit(shape, dtype):
    # 1024-element slices: several slices, a tail block and an odd element count among the cases
    w = torch.randn(shape, dtype=dtype)
    whole = quantize_nf4(w.to(torch.float32))
    sliced = quantize_in_slices(w, torch.float32, "cpu", slice_size=1024)
    assert sliced.dtype == torch.float32 and sliced.shape == whole.shape
    assert sliced.offset == whole.offset
    for a, b in zip(whole.tensors(), sliced.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="multiple of 2 \\* blocksize"):
        quantize_in_slices(w, torch.float32, "cpu", slice_size=100)


def peak_allocated_while(fn, trace):
    """Peak of torch's CPU allocator total during fn(), from the profiler's memory events (the
    "Total Allocated" of each allocation and free in the exported trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return result, max(totals, default=None)


def test_quantize_on_load_peak_is_one_weight_not_the_model(tmp_path, monkeypatch):
    config = ModelConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    save_model(Llama(config).to(torch.bfloat16), tmp_path / "ckpt")
    # Tensors read by safetensors are not allocated by torch's allocator; a clone of each puts
    # the full-precision tensor being read into the count, as it is in real memory.
    read = loading._read_tensors
    monkeypatch.setattr(loading, "_read_tensors", lambda path: ((f, n, t.clone()) for f, n, t in read(path)))
    model, peak = peak_allocated_while(lambda: load_model(tmp_path / "ckpt", quantize="nf4"),
                                       tmp_path / "trace.json")
    if peak is None:
        pytest.skip("this torch build's profiler reports no memory events")
    final = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    largest = 2 * 512 * 2048  # the largest linear weight in bfloat16 (2 MiB)
    # Measured here: 1.3x the largest weight (the weight being read, plus one slice's working
    # set). Quantizing each weight whole held 9x it; all unquantized linears together are 7.3x.
    assert peak - final <= 2 * largest, (peak - final) / largest


@pytest.mark.parametrize("bias_first", [True, False])
def test_bias_before_or_after_quantized_weight(bias_first):
    config = ModelConfig.from_hf_dict(hf_model("qwen2").config.to_dict())
    with torch.device("meta"):
        model = Llama(config)
    filler = _Filler(model, torch.float32, torch.device("cpu"), quantize=True)
    w, b = torch.randn(config.kv_size, 64), torch.randn(config.kv_size)
    name = "model.layers.0.self_attn.k_proj"
    items = [(name + ".bias", b), (name + ".weight", w)]
    for key, t in items if bias_first else items[::-1]:
        filler.add(key, t)
    layer = model.get_submodule(name)
    assert isinstance(layer, NF4Linear) and torch.equal(layer.bias, b)
    assert not layer.bias.requires_grad


def write_bnb_checkpoint(hf, path, drop=None):
    tensors = {}
    for key, value in hf.state_dict().items():
        if not is_quantized_linear(key):
            tensors[key] = value.contiguous()
            continue
        packed, state, _ = bnb_roundtrip(value)
        tensors[key] = packed
        for suffix, t in state.as_dict(packed=True).items():
            tensors[f"{key}.{suffix}"] = t
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    if drop:
        tensors.pop(drop)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["llama3.2", "qwen2"])
def test_load_bnb_4bit_checkpoint(tmp_path, family):
    hf = hf_model(family)
    write_bnb_checkpoint(hf, tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert model.config.extra["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert logits_diff(model, dequantized_reference(hf), torch.randint(0, 128, (2, 7))) <= 1e-4


def test_incomplete_bnb_tensors_are_named(tmp_path):
    write_bnb_checkpoint(hf_model("llama2"), tmp_path,
                         drop="model.layers.1.mlp.up_proj.weight.nested_absmax")
    with pytest.raises(ValueError, match=r"incomplete bitsandbytes NF4 tensors: "
                                         r"model.layers.1.mlp.up_proj.weight \(.*quant_map"):
        load_model(tmp_path)


def _tiny_checkpoint(path, **config):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, torch_dtype="float32",
                              **config))
    save_model(model, path)
    return model


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_nan_in_a_base_weight_is_refused_at_load(tmp_path, quantize):
    # for LoRA and full fine-tuning too: it used to train and then blame the learning rate
    _tiny_checkpoint(tmp_path)
    _rewrite(tmp_path, lambda t: t["model.layers.0.mlp.up_proj.weight"].view(-1).__setitem__(5, float("nan")))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' "
                                         r"holds 1 NaN or Inf value\(s\) of 2048; the checkpoint is damaged"):
        load_model(tmp_path, dtype=torch.float32, quantize=quantize)


def test_a_tied_checkpoint_with_another_head_is_refused(tmp_path):
    model = _tiny_checkpoint(tmp_path, tie_word_embeddings=True)
    embed = model.model.embed_tokens.weight.detach().clone()
    _rewrite(tmp_path, lambda t: t.__setitem__("lm_head.weight", embed.clone()))
    loaded = load_model(tmp_path, dtype=torch.float32)  # the same tensor stored twice: fine
    assert torch.equal(loaded.lm_head.weight, embed)
    _rewrite(tmp_path, lambda t: t.__setitem__("lm_head.weight", embed + 1))
    with pytest.raises(ValueError, match="tie_word_embeddings: true, .* holds a different 'lm_head.weight' "
                                         "that would go unused"):
        load_model(tmp_path, dtype=torch.float32)


def test_a_tensor_stored_in_another_dtype_is_named(tmp_path):
    _tiny_checkpoint(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, t[name].half()))
    with pytest.warns(UserWarning, match=f"1 tensor\\(s\\) are stored as float16 while config.json "
                                         f"declares float32: {re.escape(name)}; all were loaded as bfloat16"):
        load_model(tmp_path)
