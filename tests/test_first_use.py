"""What a new user meets first when loading and saving: dtype names, hub ids, token ids in
config.json, adapters PEFT can load offline, file permissions, adapters of another architecture."""
import json
import os
import stat

import pytest
import torch

import minift
from minift.files import file_mode
from minift.lora.layer import lora_wrap
from minift.models.config import ModelConfig
from minift.models.llama import Llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny(model_type="llama", **kw):
    torch.manual_seed(0)
    return Llama(ModelConfig(model_type=model_type, vocab_size=64, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=32,
                             torch_dtype="float32", **kw))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    minift.save_model(tiny(), folder)
    return folder


def test_load_model_takes_a_dtype_name(base_dir):
    model = minift.load_model(base_dir, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert minift.load_model(base_dir, dtype="torch.float32").lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype must be a floating torch dtype or its name .* got 'int8'"):
        minift.load_model(base_dir, dtype="int8")


def test_a_hub_id_says_minift_reads_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'meta-llama/Llama-3.2-1B' is not a folder: minift "
                                                r"reads checkpoints from local folders.*download "
                                                r"meta-llama/Llama-3.2-1B --local-dir Llama-3.2-1B"):
        minift.load_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder ./nowhere does not exist"):
        minift.load_model("./nowhere")


@pytest.mark.parametrize("key,value", [("bos_token_id", "1"), ("eos_token_id", 2.0),
                                       ("eos_token_id", [2, "x"]), ("eos_token_id", []),
                                       ("bos_token_id", True), ("pad_token_id", "0")])
def test_token_ids_of_the_wrong_type_in_config_json_are_refused(tmp_path, base_dir, key, value):
    config = json.loads((base_dir / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json: field '{key}' must be an integer token id"):
        ModelConfig.from_json(tmp_path)


def test_token_id_lists_and_old_pad_ids_are_kept(tmp_path, base_dir):
    config = json.loads((base_dir / "config.json").read_text())
    config.update(eos_token_id=[2, 3], pad_token_id=-1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ModelConfig.from_json(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id) == ([2, 3], -1)


def test_adapter_of_a_loaded_model_loads_in_peft_offline(tmp_path, base_dir, monkeypatch):
    model = lora_wrap(minift.load_model(base_dir, dtype="float32"), r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    minift.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the recorded path must not depend on the working folder
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-5)


def test_save_adapter_and_save_model_write_files_with_the_same_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        minift.save_model(tiny(), tmp_path / "model")
        minift.save_adapter(lora_wrap(tiny(), r=2), tmp_path / "adapter")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for folder in ("model", "adapter") for p in (tmp_path / folder).iterdir()}
    assert set(modes.values()) == {0o644}, modes
    os.umask(0o077)
    try:
        assert file_mode() == 0o600
    finally:
        os.umask(previous)


def test_an_adapter_for_another_architecture_of_the_same_shapes_warns(tmp_path):
    minift.save_adapter(lora_wrap(tiny("llama"), r=2), tmp_path / "llama-adapter")
    qwen = tiny("qwen2", attention_bias=True)
    with pytest.warns(UserWarning, match=r"llama-adapter: the adapter was trained on a llama model, "
                                         r"this model is qwen2"):
        minift.load_adapter(qwen, tmp_path / "llama-adapter")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same architecture: no warning
        minift.load_adapter(tiny("llama"), tmp_path / "llama-adapter")
