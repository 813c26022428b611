"""GGUF out: export_gguf and `python -m minift export`, read back by the gguf package (its reader
and dequantizers), by transformers' GGUF loader and by our own loader."""
from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest
import torch
from test_gguf_loading import BASE, IDS, TEXTS, converter_permute, logits, random_model

import minift
from minift.__main__ import main
from minift.models.gguf_loading import gguf_name
from minift.models.llama import Llama

gguf = pytest.importorskip("gguf")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q6_k", "q4_k_m")
# the largest |dequantized - float| a type allows, as a fraction of its block's largest |weight|:
# a whole quantization step (blocks of 32: absmax / 127 for 8 bits, / 8 for 4 bits symmetric,
# range / 15 <= 2 absmax / 15 affine; K types: the sub-block scales are quantized too, so twice
# their step), each times (1 + 2^-10) for the fp16 rounding of the stored scale; F16 / BF16:
# the relative rounding of one element (plus F16's subnormal step)
BLOCK_BOUND = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 2 / 15, "Q6_K": 2 / 31, "Q4_K": 4 / 15}
ELEMENT_BOUND = {"F32": (0.0, 0.0), "F16": (2.0**-11, 2.0**-25), "BF16": (2.0**-8, 0.0)}


@pytest.fixture(scope="module")
def base():
    return minift.load_model(BASE, dtype=torch.float32)


def reference_weights(model: Llama) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weight in llama.cpp's row order (the converter's permutation)."""
    c, out = model.config, {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        g, w = gguf_name(name), p.detach().float().numpy()
        if c.model_type != "qwen2" and (".attn_q." in g or ".attn_k." in g):
            w = converter_permute(w, c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads)
        out[g] = w
    return out


def check_against_gguf_package(path, model: Llama) -> dict[str, str]:
    """Every tensor the gguf package dequantizes lies within its type's bound of the float weight;
    returns the type of each tensor."""
    want = reference_weights(model)
    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == set(want)
    types = {}
    for t in reader.tensors:
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want[t.name].shape)
        w, kind = want[t.name], t.tensor_type.name
        types[t.name] = kind
        if kind in ELEMENT_BOUND:
            relative, absolute = ELEMENT_BOUND[kind]
            assert np.all(np.abs(got - w) <= relative * np.abs(w) + absolute), t.name
            continue
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        absmax = np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True)
        err = np.abs(got - w).reshape(-1, block)
        bound = BLOCK_BOUND[kind] * (1 + 2.0**-10) * absmax
        assert np.all(err <= bound), (t.name, kind, float((err / absmax).max()))
    return types


def loaded_equals_gguf_package(path, loaded: Llama) -> None:
    """Our loader's weights are exactly the gguf package's dequantization, rows put back."""
    reader = gguf.GGUFReader(str(path))
    state = {gguf_name(n): p for n, p in loaded.state_dict().items()
             if not (n == "lm_head.weight" and loaded.config.tie_word_embeddings)}
    for t in reader.tensors:
        got = state[t.name].numpy()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            c = loaded.config
            got = converter_permute(got, c.num_attention_heads if ".attn_q." in t.name else c.num_key_value_heads)
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(got.shape)
        assert np.array_equal(got, want), t.name


@pytest.mark.parametrize("quant", QUANTS)
def test_export_base_at_each_quant(tmp_path, base, quant):
    path = tmp_path / f"base-{quant}.gguf"
    info = minift.export_gguf(BASE, path, quant=quant)
    assert info["bytes"] == os.path.getsize(path)
    assert info["parameters"] == sum(p.numel() for p in base.parameters())
    types = check_against_gguf_package(path, base)
    assert all(types[n] == "F32" for n in types if "norm" in n)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == minift.deploy.gguf_export.FILE_TYPES[quant]
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.context_length"].contents() == 512
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 512
    loaded = minift.load_model(path, dtype=torch.float32)
    loaded_equals_gguf_package(path, loaded)
    diff = (logits(loaded) - logits(base)).abs().max() / logits(base).abs().max()
    assert diff == 0 if quant == "f32" else diff < 1e-3 if quant == "f16" else True
    assert info["bits_per_weight"] == pytest.approx(8 * info["tensor_bytes"] / info["parameters"])


def test_k_quant_mix_on_rows_that_fill_blocks(tmp_path):
    model = random_model(0.05, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "k.gguf"
    minift.export_gguf(model, path, quant="q4_k_m", tokenizer=minift.load_tokenizer(BASE))
    types = check_against_gguf_package(path, model)
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    # llama.cpp's use_more_bits layers: of 2 layers, the last (i >= 7 * 2 // 8)
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
    loaded_equals_gguf_package(path, minift.load_model(path, dtype=torch.float32))


@pytest.mark.slow
def test_transformers_runs_our_export(tmp_path, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tmp_path / "base-q8_0.gguf"
    minift.export_gguf(BASE, path, quant="q8_0")
    ours = minift.load_model(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (logits(ours) - ref(IDS).logits).abs().max() <= 1e-4
    tok, hf_tok = minift.load_tokenizer(BASE), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_qwen2_export_round_trip(tmp_path):
    model = random_model(0.2, model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=True, tie_word_embeddings=True)
    path = tmp_path / "q.gguf"
    minift.export_gguf(model, path, quant="f32", tokenizer=minift.load_tokenizer(BASE))
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "qwen2"
    check_against_gguf_package(path, model)  # biases written, rows not permuted, no output.weight
    loaded = minift.load_model(path, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings and loaded.config.attention_bias
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
])
def test_extended_context_round_trip(tmp_path, base, scaling):
    model = copy.deepcopy(base)
    model.config.rope_scaling = dict(scaling)
    model.config.max_position_embeddings = 1024 if scaling["rope_type"] == "linear" else 2048
    path = tmp_path / "long.gguf"
    minift.export_gguf(model, path, quant="f32", tokenizer=minift.load_tokenizer(BASE))
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["llama.rope.scaling.original_context_length"].contents() == 512
    assert fields["llama.context_length"].contents() == model.config.max_position_embeddings
    loaded = minift.load_model(path, dtype=torch.float32)
    assert loaded.config.rope_scaling["factor"] == scaling["factor"]
    assert loaded.config.max_position_embeddings == model.config.max_position_embeddings


def test_llama3_scaling_is_written_as_rope_freqs(tmp_path, base):
    model = copy.deepcopy(base)
    model.config.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = tmp_path / "l3.gguf"
    minift.export_gguf(model, path, quant="f16", tokenizer=minift.load_tokenizer(BASE))
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(t.data)
    head_dim, theta = 32, 10000.0
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    # Llama 3.1's rule: long wavelengths (> 64 / 1) divided by 8, short ones (< 64 / 4) kept
    assert np.allclose(factors[wavelength > 64], 8.0) and np.allclose(factors[wavelength < 16], 1.0)
    with pytest.raises(ValueError, match=r"rope_freqs.weight.*not supported yet"):
        minift.load_model(path)


def test_merged_adapter_export_from_the_command_line(tmp_path, base, capsys):
    model = minift.lora_wrap(copy.deepcopy(base), r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    minift.save_adapter(model, tmp_path / "adapter")
    merged = minift.merge_lora(model).eval()
    out = tmp_path / "merged.gguf"
    assert main(["export", str(BASE), "--to", "gguf", "--quant", "f32", "-o", str(out),
                 "--adapter", str(tmp_path / "adapter")]) == 0
    assert "bits per weight" in capsys.readouterr().out
    loaded = minift.load_model(out, dtype=torch.float32)
    assert (logits(loaded) - logits(merged)).abs().max() < 1e-5
    assert (logits(loaded) - logits(base)).abs().max() > 1e-2  # the adapter changed the model


def test_nf4_model_exports_its_dequantized_weights(tmp_path):
    nf4 = minift.load_model(BASE, dtype=torch.float32, quantize="nf4")
    path = tmp_path / "nf4.gguf"
    minift.export_gguf(nf4, path, quant="f32")  # tokenizer from the model's folder
    loaded = minift.load_model(path, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight,
                       nf4.model.layers[0].self_attn.q_proj.dequantize(torch.float32))
    assert torch.equal(logits(loaded), logits(nf4))


def test_export_refuses_unmerged_adapters(tmp_path, base):
    with pytest.raises(ValueError, match=r"LoRA adapters .* call minift.merge_lora"):
        minift.export_gguf(minift.lora_wrap(copy.deepcopy(base), r=2), tmp_path / "x.gguf", quant="f32")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("argv, match", [
    (["export", "no/such/dir", "-o", "x.gguf"], r"model folder no/such/dir does not exist"),
    (["export", str(BASE), "--quant", "q3_k", "-o", "x.gguf"], r"unknown GGUF quant 'q3_k'; choose one of"),
    (["export", str(BASE), "--to", "onnx", "-o", "x.gguf"], r"invalid choice: 'onnx'"),
    (["export", str(BASE), "-o", "x.gguf", "--adapter", "no/adapter"], r"no/adapter"),
])
def test_command_line_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("minift export: error: ") or err.startswith("minift: error: ")
    assert re.search(match, err), err


def test_missing_output_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"output folder .*no_such_dir does not exist"):
        minift.export_gguf(BASE, tmp_path / "no_such_dir" / "x.gguf", quant="f32")
