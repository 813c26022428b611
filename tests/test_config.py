import json
import re

import pytest

from minift.models.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name,billions", [
    ("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-3-8b", 8.03), ("llama-3.2-1b", 1.24),
    ("mistral-7b", 7.24), ("qwen2-7b", 7.62), ("qwen2.5-0.5b", 0.49), ("llama-2-70b", 68.98),
    ("llama-3.1-8b", 8.03), ("llama-3.2-3b", 3.21), ("mistral-7b-v0.3", 7.25), ("qwen2.5-7b", 7.62),
])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    # Published sizes of each checkpoint, to the stated precision.
    assert ModelConfig.from_name(name).num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: .*llama-3-8b"):
        ModelConfig.from_name("llama-9-1b")


def test_hf_round_trip(tmp_path):
    cfg = ModelConfig.from_name("llama-3.2-1b")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    again = ModelConfig.from_json(tmp_path)
    assert again == cfg
    assert json.loads(path.read_text())["architectures"] == ["LlamaForCausalLM"]


def test_bad_config_errors_name_file_and_key(tmp_path):
    d = ModelConfig.from_name("tiny").to_hf_dict()
    d["model_type"] = "gpt2"
    with pytest.raises(ValueError, match="unsupported architecture.*supported model types: llama"):
        ModelConfig.from_hf_dict(d, source="x/config.json")
    d = ModelConfig.from_name("tiny").to_hf_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="x/config.json: missing required key 'hidden_size'"):
        ModelConfig.from_hf_dict(d, source="x/config.json")
    d = ModelConfig.from_name("tiny").to_hf_dict()
    d["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict(d)
    (tmp_path / "config.json").write_text("{\n  \"a\": 1,\n  oops\n}")
    with pytest.raises(ValueError, match=r"config.json:3: invalid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "missing")


def test_all_presets_valid():
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        assert cfg.hidden_size > 0 and cfg.num_attention_heads % cfg.num_key_value_heads == 0


def test_rope_parameters_block_maps_to_rope_fields():
    # transformers >= 5 writes rope settings as one "rope_parameters" object.
    d = ModelConfig.from_name("tiny").to_hf_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert "rope_parameters" not in cfg.extra
    d["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None


@pytest.mark.parametrize("key,value,match", [
    ("rms_norm_eps", "1e-5", "field 'rms_norm_eps' must be a finite number > 0, got '1e-5'"),
    ("rms_norm_eps", float("nan"), "field 'rms_norm_eps' must be a finite number > 0"),
    ("hidden_size", "64", "field 'hidden_size' must be a positive integer, got '64'"),
    ("num_attention_heads", 4.0, "field 'num_attention_heads' must be a positive integer"),
    ("rope_theta", None, "field 'rope_theta' must be a finite number > 0, got None"),
    ("tie_word_embeddings", "false", "field 'tie_word_embeddings' must be true or false"),
    ("sliding_window", 0, "field 'sliding_window' must be a positive integer or null"),
    ("rope_scaling", "llama3", "field 'rope_scaling' must be an object or null"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
     r"field 'rope_scaling' \(rope_type 'llama3'\) is missing high_freq_factor, "
     r"original_max_position_embeddings"),
    ("rope_scaling", {"rope_type": "linear", "factor": "4"},
     r"field 'rope_scaling' \(rope_type 'linear'\): 'factor' must be a finite number > 0, got '4'"),
])
def test_wrong_types_name_the_file_and_field(tmp_path, key, value, match):
    # A config.json value of the wrong type is a ValueError naming the file (not "config", and
    # not a TypeError from arithmetic on a string).
    d = ModelConfig.from_name("tiny").to_hf_dict()
    d[key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: {match}"):
        ModelConfig.from_json(tmp_path)


def test_configs_built_in_code_still_say_config():
    with pytest.raises(ValueError, match="^config: field 'rms_norm_eps'"):
        ModelConfig(rms_norm_eps="1e-5")
    # unsupported rope types pass the config (memory planning reads them); the model refuses
    assert ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}).rope_scaling["factor"] == 4.0


def test_non_utf8_config_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{\n  "model_type": "llama",\n  "x": "\xff"\n}')
    with pytest.raises(ValueError, match=r"config.json:3: not valid UTF-8"):
        ModelConfig.from_json(tmp_path)


def test_long_context_presets_carry_their_rope_scaling():
    # Llama 3.1 scales RoPE by 8 from 8192 original positions to 131072; Mistral v0.3 has no
    # sliding window and a 32768-token vocabulary
    cfg = ModelConfig.from_name("llama-3.1-8b")
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.max_position_embeddings == 131072
    assert cfg.rope_scaling["original_max_position_embeddings"] == 8192
    v03 = ModelConfig.from_name("mistral-7b-v0.3")
    assert (v03.vocab_size, v03.sliding_window, v03.rope_theta) == (32768, None, 1e6)


def test_dtype_is_read_from_either_key_and_written_to_both(tmp_path):
    d = ModelConfig.from_name("tiny").to_hf_dict()
    assert d["dtype"] == d["torch_dtype"] == "bfloat16"
    del d["torch_dtype"]
    d["dtype"] = "float32"  # transformers 5 writes only "dtype"
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.torch_dtype == "float32" and "dtype" not in cfg.extra
    back = cfg.to_hf_dict()
    assert back["dtype"] == back["torch_dtype"] == "float32"
    d["torch_dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json: 'dtype' \('float32'\) and 'torch_dtype' "
                                         r"\('float16'\) disagree; keep one"):
        ModelConfig.from_json(tmp_path)


def test_a_dtype_that_is_no_dtype_names_the_field(tmp_path):
    d = ModelConfig.from_name("tiny").to_hf_dict()
    del d["dtype"]
    d["torch_dtype"] = "bogus"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json: field 'torch_dtype' \(or 'dtype'\) must name a "
                                         r"floating dtype \(float32, bfloat16, float16, float64\), "
                                         r"got 'bogus'"):
        ModelConfig.from_json(tmp_path)
