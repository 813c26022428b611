"""minift.extend_context (minift/models/context.py): the config transformers reads, the tables the
model caches, saved models and adapters that carry the extension."""
import json

import pytest
import torch
from safetensors import safe_open

import minift
from minift.lora.adapter import WEIGHTS_NAME
from minift.models.config import ModelConfig
from minift.models.context import METHODS, ROPE_METADATA_KEY, context_length
from minift.models.llama import Llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

L = 16  # the base's context; extended to 4L
VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L)


def hf_base(**more):
    config = transformers.LlamaConfig(**dict(BASE, **more), attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def minift_from_hf(hf):
    model = Llama(ModelConfig.from_hf_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.eval()


def logits(model, ids, **kw):
    with torch.no_grad():
        out = model(ids, **kw)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("method", METHODS)
def test_config_says_what_transformers_reads(method):
    model = minift_from_hf(hf_base())
    assert minift.extend_context(model, 4 * L, method=method) is model
    factor = 4 * L / L
    want = {"yarn": (4 * L, {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L}),
            "linear": (4 * L, {"rope_type": "linear", "factor": factor}),
            # transformers grows the base past max_position_embeddings: it stays the original
            "dynamic": (L, {"rope_type": "dynamic", "factor": factor})}[method]
    assert (model.config.max_position_embeddings, model.config.rope_scaling) == want
    assert context_length(model.config) == 4 * L


@pytest.mark.parametrize("method", METHODS)
def test_saved_extended_model_gives_transformers_the_same_logits(tmp_path, method):
    model = minift_from_hf(hf_base())
    ids = torch.randint(0, VOCAB, (2, 4 * L))
    before = logits(model, ids)  # fills the RoPE cache with the base's tables
    minift.extend_context(model, 4 * L, method=method)
    after = logits(model, ids)
    assert max_diff(after, before) > 1e-3  # the tables were recomputed
    minift.save_model(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"] == model.config.rope_scaling
    def load():  # fresh each time: transformers' dynamic RoPE keeps its longest call's tables
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    assert max_diff(logits(load(), ids), after) <= 1e-5
    late = torch.arange(3 * L, 3 * L + 9).expand(2, 9)  # positions past the original length only
    assert max_diff(logits(load(), ids[:, :9], position_ids=late),
                    logits(model, ids[:, :9], position_ids=late)) <= 1e-5
    again = minift.load_model(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(again, ids), after)


@pytest.mark.parametrize("method", METHODS)
def test_extending_twice_equals_extending_once(method):
    hf = hf_base()
    once, twice = minift_from_hf(hf), minift_from_hf(hf)
    minift.extend_context(once, 4 * L, method=method)
    minift.extend_context(minift.extend_context(twice, 2 * L, method=method), 4 * L, method=method)
    assert twice.config.rope_scaling == once.config.rope_scaling
    ids = torch.randint(0, VOCAB, (1, 4 * L))
    assert torch.equal(logits(twice, ids), logits(once, ids))


def test_qwen25_yarn_recipe_extends_from_its_original_length():
    # Qwen2.5's long-context config adds yarn x4 and leaves max_position_embeddings at 32768
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **BASE, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": L})).eval()
    model = minift_from_hf(hf)
    assert context_length(model.config) == 4 * L
    with pytest.raises(ValueError, match=f"max_length {4 * L} is not larger than the model's context of "
                                         f"{4 * L} tokens"):
        minift.extend_context(model, 4 * L)
    minift.extend_context(model, 8 * L)
    assert model.config.max_position_embeddings == 8 * L
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 8.0,
                                         "original_max_position_embeddings": L}


def test_yarn_keeps_the_tuning_of_an_earlier_yarn():
    model = minift_from_hf(hf_base(rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": 16,
                                                 "original_max_position_embeddings": L}))
    minift.extend_context(model, 4 * L)
    assert model.config.rope_scaling["beta_fast"] == 16 and model.config.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("call,error,message", [
    (lambda m: minift.extend_context(m, L), ValueError,
     f"max_length {L} is not larger than the model's context of {L} tokens"),
    (lambda m: minift.extend_context(m, 4 * L, method="ntk"), ValueError,
     "method must be one of yarn, linear, dynamic, got 'ntk'"),
    (lambda m: minift.extend_context(m, 64.0), ValueError, "max_length must be a positive integer, got 64.0"),
    (lambda m: minift.extend_context(m, True), ValueError, "max_length must be a positive integer"),
    (lambda m: minift.extend_context(torch.nn.Linear(2, 2), 4 * L), TypeError,
     "expected a minift Llama model"),
])
def test_bad_calls_are_one_line_errors(call, error, message):
    model = minift_from_hf(hf_base())
    with pytest.raises(error, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)
    assert (model.config.max_position_embeddings, model.config.rope_scaling) == (L, None)


def test_a_scaled_model_is_extended_only_by_its_own_method():
    model = minift_from_hf(hf_base())
    minift.extend_context(model, 2 * L, method="linear")
    with pytest.raises(ValueError, match="already scaled by rope_type 'linear'; method='yarn' would "
                                         "stack two scalings.*use method='linear'"):
        minift.extend_context(model, 4 * L, method="yarn")
    with pytest.raises(ValueError, match="not larger than the model's context of 32 tokens"):
        minift.extend_context(model, 2 * L, method="linear")


def test_llama3_is_refused_with_the_way_out():
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L}
    model = minift_from_hf(hf_base(rope_scaling=dict(scaling), max_position_embeddings=4 * L))
    with pytest.raises(ValueError, match="already 'llama3' .*raise rope_scaling\\['factor'\\]") as err:
        minift.extend_context(model, 8 * L)
    assert "\n" not in str(err.value)
    assert model.config.rope_scaling["factor"] == 4.0 and model.config.max_position_embeddings == 4 * L


# ---- adapters and merged saves --------------------------------------------------------------
def trained_adapter(model, path):
    """LoRA on `model` with non-zero B (as if trained), saved to `path`."""
    minift.lora_wrap(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    minift.save_adapter(model, path)
    return model


def test_adapter_carries_the_extension_to_an_unextended_base(tmp_path):
    hf = hf_base()
    model = trained_adapter(minift.extend_context(minift_from_hf(hf), 4 * L), tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 4 * L))
    expected = logits(model, ids)
    with safe_open(str(tmp_path / "adapter" / WEIGHTS_NAME), framework="pt") as f:
        record = json.loads(f.metadata()[ROPE_METADATA_KEY])
    assert record == {"max_position_embeddings": 4 * L, "rope_scaling": model.config.rope_scaling}
    base = minift_from_hf(hf)
    minift.load_adapter(base, tmp_path / "adapter")
    assert base.config.rope_scaling == model.config.rope_scaling
    assert torch.equal(logits(base, ids), expected)
    # PEFT users: the adapter on a transformers base saved with the same extension
    minift.save_model(minift.extend_context(minift_from_hf(hf), 4 * L), tmp_path / "base")
    hf_extended = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_extended, tmp_path / "adapter").eval()
    assert max_diff(logits(peft_model, ids), expected) <= 1e-5


def test_adapter_refuses_a_base_extended_another_way(tmp_path):
    hf = hf_base()
    trained_adapter(minift.extend_context(minift_from_hf(hf), 4 * L), tmp_path)
    other = minift.extend_context(minift_from_hf(hf), 2 * L)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: the adapter was trained with "
                                         f"max_position_embeddings {4 * L}.*unscaled base") as err:
        minift.load_adapter(other, tmp_path)
    assert "\n" not in str(err.value)
    assert not [n for n, _ in other.named_parameters() if "lora_" in n]  # nothing changed
    assert other.config.max_position_embeddings == 2 * L


def test_adapter_of_an_unextended_model_records_nothing(tmp_path):
    trained_adapter(minift_from_hf(hf_base()), tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert ROPE_METADATA_KEY not in f.metadata()


def test_merged_extended_model_loads_in_transformers(tmp_path):
    model = trained_adapter(minift.extend_context(minift_from_hf(hf_base()), 4 * L, method="yarn"),
                            tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 4 * L))
    expected = logits(model, ids)
    minift.save_model(minift.merge_lora(model), tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert back.config.rope_parameters["rope_type"] == "yarn"
    assert max_diff(logits(back.eval(), ids), expected) <= 1e-5
