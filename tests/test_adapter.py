"""Tests for minift/lora/adapter.py: PEFT-format adapters, checked against peft and transformers."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import minift
from minift.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from minift.lora.layer import LoRALinear, lora_state_dict, lora_wrap

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


@pytest.fixture(scope="module")
def base():
    """A tiny random Llama with Hugging Face module names (2 layers, hidden 32)."""
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomize_b(model):
    """Non-zero B so the adapters change the output (a fresh B is zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def minift_adapter(base, tmp_path, **kwargs):
    model = lora_wrap(copy.deepcopy(base), **kwargs)
    randomize_b(model)
    minift.save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    return model


INTEROP = [
    dict(r=4, alpha=8, target_modules="all-linear"),
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=3, alpha=5, target_modules="all-linear", rslora=True),
    dict(r=2, alpha=7, target_modules=["q_proj", "v_proj"], rslora=True),
]


@pytest.mark.parametrize("kw", INTEROP)
def test_minift_adapter_loads_in_peft(base, ids, tmp_path, kw):
    model = minift_adapter(base, tmp_path, **kw)
    expected = logits(model, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3  # the adapter matters
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", INTEROP)
def test_peft_adapter_loads_in_minift(base, ids, tmp_path, kw):
    config = peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["target_modules"],
                             use_rslora=kw.get("rslora", False), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomize_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model, ids)
    model = minift.load_adapter(copy.deepcopy(base), tmp_path)
    n_peft = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == n_peft
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    with minift.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)


def test_config_and_keys_in_peft_format(base, tmp_path):
    model = minift_adapter(base, tmp_path, r=4, alpha=8, dropout=0.1,
                           target_modules=["q_proj", "v_proj"])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["use_rslora"] is False and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny-llama"
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert key in tensors and tensors[key].shape == (16, 4)  # (out = 2 kv heads * 8, r)
    assert sorted(tensors) == sorted("base_model.model." + k for k in lora_state_dict(model))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary files were renamed away


def test_partial_targets_are_written_as_full_paths(base, tmp_path, ids):
    model = minift_adapter(base, tmp_path, r=2, target_modules=r"model\.layers\.0\..*q_proj")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_round_trip_is_exact(base, tmp_path, ids):
    model = minift_adapter(base, tmp_path, r=4, alpha=8, rslora=True)
    loaded = minift.load_adapter(copy.deepcopy(base), tmp_path)
    mine, theirs = lora_state_dict(model), lora_state_dict(loaded)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    grads = {n: p.requires_grad for n, p in loaded.named_parameters()}
    assert all(g == ("lora_" in n) for n, g in grads.items())
    # into an already-wrapped model with the same settings
    again = lora_wrap(copy.deepcopy(base), r=4, alpha=8, rslora=True)
    minift.load_adapter(again, tmp_path)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_load_into_wrapped_model_with_other_settings(base, tmp_path):
    minift_adapter(base, tmp_path, r=4, alpha=8)
    for kw, match in [(dict(r=4, alpha=16), r"lora_alpha=8 but .* has lora_alpha=16"),
                      (dict(r=4, alpha=8, rslora=True), "use_rslora=False"),
                      (dict(r=2, alpha=8), r"r=4 but .* has r=2")]:
        with pytest.raises(ValueError, match=match):
            minift.load_adapter(lora_wrap(copy.deepcopy(base), **kw), tmp_path)
    other = lora_wrap(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"match no adapter of this model.*down_proj\.lora_A"):
        minift.load_adapter(other, tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(base, tmp_path):
    minift_adapter(base, tmp_path, r=4, target_modules=["q_proj"])
    file = tmp_path / WEIGHTS_NAME
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, file)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(4, 31\).*\(4, 32\)"):
        minift.load_adapter(target, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in target.modules())  # left unchanged


def test_missing_and_unexpected_keys(base, tmp_path):
    minift_adapter(base, tmp_path, r=4, target_modules=["q_proj"])
    file = tmp_path / WEIGHTS_NAME
    tensors = load_file(file)
    gone = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors.pop(gone)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"missing adapter tensors.*layers\.1\.self_attn\.q_proj"):
        minift.load_adapter(copy.deepcopy(base), tmp_path)
    tensors[gone] = torch.zeros(32, 4)
    tensors["base_model.model.model.norm.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"match no adapter.*model\.norm\.lora_A\.weight"):
        minift.load_adapter(copy.deepcopy(base), tmp_path)


def test_missing_directory(base, tmp_path):
    path = tmp_path / "no-such-adapter"
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        minift.load_adapter(copy.deepcopy(base), path)


def write_config(tmp_path, base, text):
    minift_adapter(base, tmp_path, r=4)
    (tmp_path / CONFIG_NAME).write_text(text)


GOOD = dict(peft_type="LORA", r=4, lora_alpha=16, target_modules="all-linear")


@pytest.mark.parametrize("text, match", [
    ('{"peft_type": "LORA",\n "r": 4,\n oops}', r"adapter_config\.json:3: invalid JSON"),
    ("[1, 2]", r"adapter_config\.json: expected a JSON object"),
    (json.dumps(dict(GOOD, peft_type="PREFIX_TUNING")), r"'peft_type' must be \"LORA\""),
    (json.dumps({k: v for k, v in GOOD.items() if k != "peft_type"}), "'peft_type'.*None"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "r"}), r"missing required field 'r'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "target_modules"}), "'target_modules'"),
    (json.dumps(dict(GOOD, r=0)), r"adapter_config\.json: field 'r': .*r=0"),
    (json.dumps(dict(GOOD, lora_alpha="x")), "field 'lora_alpha': .*alpha='x'"),
    (json.dumps(dict(GOOD, lora_alpha=float("inf"))), "field 'lora_alpha': .*alpha=inf"),
    (json.dumps(dict(GOOD, r=True)), "field 'r': .*r=True"),
    (json.dumps(dict(GOOD, lora_dropout=1.5)), r"field 'lora_dropout': .*dropout=1\.5"),
    (json.dumps(dict(GOOD, lora_dropout="0.1")), r"field 'lora_dropout': .*dropout='0\.1'"),
    (json.dumps(dict(GOOD, lora_dropout=False)), "field 'lora_dropout': .*dropout=False"),
    (json.dumps(dict(GOOD, use_rslora="yes")), r"adapter_config\.json: field 'use_rslora' must be true or "
                                               "false, got 'yes'"),
    (json.dumps(dict(GOOD, use_rslora="false")), "field 'use_rslora' .* got 'false'"),
    (json.dumps(dict(GOOD, use_rslora=1)), "field 'use_rslora' .* got 1"),
    (json.dumps(dict(GOOD, target_modules=[1])), "'target_modules' must be"),
    (json.dumps(dict(GOOD, use_dora=True)), r"'use_dora'=True is not supported"),
    (json.dumps(dict(GOOD, bias="all")), r"'bias'='all' is not supported"),
    (json.dumps(dict(GOOD, target_modules=["wq"])), r"adapter_config\.json: .*\['wq'\]"),
])
def test_bad_config(base, tmp_path, text, match):
    write_config(tmp_path, base, text)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        minift.load_adapter(target, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in target.modules())


def test_missing_or_corrupt_files(base, tmp_path):
    minift_adapter(base, tmp_path, r=4)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: cannot read"):
        minift.load_adapter(copy.deepcopy(base), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: missing"):
        minift.load_adapter(copy.deepcopy(base), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json: missing"):
        minift.load_adapter(copy.deepcopy(base), tmp_path)


def test_save_needs_unmerged_adapters(base, tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        minift.save_adapter(copy.deepcopy(base), tmp_path)
    model = lora_wrap(copy.deepcopy(base), r=2)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        minift.save_adapter(model, tmp_path)


def test_an_adapter_of_another_base_warns_with_both_names(base, tmp_path):
    # same shapes, another base: it loads, and says which base it was trained on
    (tmp_path / "base-a").mkdir()
    (tmp_path / "base-b").mkdir()
    trained = lora_wrap(copy.deepcopy(base), r=4, alpha=8)
    randomize_b(trained)
    minift.save_adapter(trained, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base-a"))
    same = copy.deepcopy(base)
    same.name_or_path = str(tmp_path / "x" / ".." / "base-a")  # the same folder, spelled otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minift.load_adapter(same, tmp_path / "adapter")
    hub = copy.deepcopy(base)
    hub.name_or_path = "someone/base-a"  # a hub id and its local download
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minift.load_adapter(hub, tmp_path / "adapter")
    other = copy.deepcopy(base)
    other.name_or_path = str(tmp_path / "base-b")
    with pytest.warns(UserWarning, match=r"adapter: the adapter was trained on base '.*base-a', but is "
                                         r"being loaded onto '.*base-b'"):
        minift.load_adapter(other, tmp_path / "adapter")
