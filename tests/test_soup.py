"""minift/lora/soup.py: averaging PEFT adapters, the identity of k copies, weights, refusals, the CLI,
and the soup loading in peft."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import minift
from minift.__main__ import main
from minift.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from minift.lora.layer import lora_state_dict, lora_wrap
from minift.lora.soup import average_adapters, soup

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def make_adapter(base, path, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), name="tiny-llama"):
    torch.manual_seed(seed)
    model = lora_wrap(copy.deepcopy(base), r=r, alpha=alpha, target_modules=list(targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.3)
    minift.save_adapter(model, path, base_model_name_or_path=name)
    return load_file(str(path / WEIGHTS_NAME))


def test_k_copies_of_one_adapter_average_to_itself(base, tmp_path):
    tensors = make_adapter(base, tmp_path / "a", seed=1)
    state = average_adapters([tmp_path / "a"] * 3)
    assert set(state) == set(tensors)
    for key, t in tensors.items():
        assert torch.equal(state[key], t), key
    weighted = average_adapters([tmp_path / "a"] * 3, weights=[0.2, 0.5, 0.3])
    for key, t in tensors.items():
        torch.testing.assert_close(weighted[key], t, rtol=0, atol=1e-7)


def test_uniform_and_weighted_means(base, tmp_path):
    a = make_adapter(base, tmp_path / "a", seed=1)
    b = make_adapter(base, tmp_path / "b", seed=2)
    c = make_adapter(base, tmp_path / "c", seed=3)
    uniform = average_adapters([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    weighted = average_adapters([tmp_path / "a", tmp_path / "b", tmp_path / "c"], weights=[2, 1, 1])
    only_b = average_adapters([tmp_path / "a", tmp_path / "b"], weights=[0, 1])
    for key in a:
        torch.testing.assert_close(uniform[key], (a[key] + b[key] + c[key]) / 3)
        torch.testing.assert_close(weighted[key], 0.5 * a[key] + 0.25 * b[key] + 0.25 * c[key])
        assert torch.equal(only_b[key], b[key])
        assert not torch.equal(uniform[key], a[key])


@pytest.mark.parametrize("other, words", [
    (dict(r=2, alpha=4), "has r=2 but"),
    (dict(alpha=16), "has lora_alpha=16 but"),
    (dict(targets=("q_proj", "k_proj")), "has target_modules="),
    (dict(name="another-base"), "base_model_name_or_path='another-base'"),
])
def test_refuses_adapters_that_do_not_match(base, tmp_path, other, words):
    make_adapter(base, tmp_path / "a", seed=1)
    make_adapter(base, tmp_path / "b", seed=2, **other)
    with pytest.raises(ValueError, match="only adapters of one base") as err:
        average_adapters([tmp_path / "a", tmp_path / "b"])
    assert words in str(err.value) and str(tmp_path / "b") in str(err.value)


def test_refuses_same_settings_but_other_shapes(tmp_path, base):
    make_adapter(base, tmp_path / "a", seed=1)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    make_adapter(wider, tmp_path / "b", seed=2)
    with pytest.raises(ValueError, match=r"has shape \(4, 48\) but \(4, 32\)"):
        average_adapters([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("weights, words", [
    ([1.0], "1 weights for 2 adapters"), ([0, 0], "sum to 0"), ([1, -1], "weights\\[1\\]"),
    ([1, float("inf")], "weights\\[1\\]")])
def test_bad_weights(base, tmp_path, weights, words):
    make_adapter(base, tmp_path / "a", seed=1)
    with pytest.raises(ValueError, match=words):
        average_adapters([tmp_path / "a", tmp_path / "a"], weights=weights)


def test_soup_loads_in_peft_and_in_minift_with_the_same_logits(base, tmp_path):
    make_adapter(base, tmp_path / "a", seed=1)
    make_adapter(base, tmp_path / "b", seed=2)
    out = soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup", weights=[3, 1])
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "tiny-llama"
    ids = torch.randint(0, VOCAB, (2, 7))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ours = minift.load_adapter(copy.deepcopy(base), out).eval()
    want = average_adapters([tmp_path / "a", tmp_path / "b"], weights=[0.75, 0.25])
    got = {"base_model.model." + k: v for k, v in lora_state_dict(ours).items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        expected = ours(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the soup does something


def test_cli_writes_the_soup_and_reports_bad_input_in_one_line(base, tmp_path, capsys):
    make_adapter(base, tmp_path / "a", seed=1)
    make_adapter(base, tmp_path / "b", seed=2)
    assert main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "d"),
                 "--weights", "1,3"]) == 0
    written = load_file(str(tmp_path / "d" / WEIGHTS_NAME))
    want = average_adapters([tmp_path / "a", tmp_path / "b"], weights=[1, 3])
    assert all(torch.equal(written[k], want[k]) for k in want)
    assert "averaged 2 adapters" in capsys.readouterr().out
    make_adapter(base, tmp_path / "c", seed=3, r=2)
    with pytest.raises(SystemExit) as exit_:
        main(["soup", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "has r=2 but" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["soup", str(tmp_path / "a"), "--out", str(tmp_path / "e"), "--weights", "x"])
    assert "--weights: expected comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soup", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert "adapter directory not found" in capsys.readouterr().err



def test_warns_when_the_adapters_do_not_share_a_start(base, tmp_path):
    # fine-tunes of one start: A moved a little from the shared initialisation, B learned
    shared = make_adapter(base, tmp_path / "start", seed=1)
    for name, seed in (("x", 11), ("y", 12)):
        torch.manual_seed(seed)
        tensors = {k: (t + 0.05 * torch.randn_like(t) if "lora_A" in k else torch.randn_like(t))
                   for k, t in shared.items()}
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text((tmp_path / "start" / CONFIG_NAME).read_text())
        save_file(tensors, str(tmp_path / name / WEIGHTS_NAME))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        average_adapters([tmp_path / "x", tmp_path / "y"])
    make_adapter(base, tmp_path / "other", seed=2)  # another random start
    with pytest.warns(UserWarning, match=r"other and .*x do not share a starting point \(their A "
                                         r"matrices have a mean cosine similarity of -?0\.\d\d\)"):
        average_adapters([tmp_path / "x", tmp_path / "other"])


def _minift_adapter(path, seed, extend):
    """An adapter of a small minift Llama, trained (here: drawn) under extend_context or not."""
    torch.manual_seed(0)
    model = minift.Llama(minift.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=64))
    if extend:
        minift.extend_context(model, 256, method="yarn")
    model = lora_wrap(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.3)
    minift.save_adapter(model, path, base_model_name_or_path="tiny-minift")


def test_soup_carries_the_rope_record_and_refuses_a_mix(tmp_path):
    from safetensors import safe_open

    from minift.models.context import ROPE_METADATA_KEY
    for name, seed, extend in (("a", 1, True), ("b", 2, True), ("plain", 3, False)):
        _minift_adapter(tmp_path / name, seed, extend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # independently drawn adapters: the other-start warning
        out = soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
        with pytest.raises(ValueError, match=f"{ROPE_METADATA_KEY}=None.*only adapters trained on one base "
                                             "under one RoPE"):
            average_adapters([tmp_path / "a", tmp_path / "plain"])

    def meta(path):
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            return f.metadata()
    assert meta(out)[ROPE_METADATA_KEY] == meta(tmp_path / "a")[ROPE_METADATA_KEY]
    assert meta(out)["base_model_type"] == meta(tmp_path / "a")["base_model_type"]
    # loading the soup onto the unextended base stretches its RoPE as each adapter's would
    torch.manual_seed(0)
    base = minift.Llama(minift.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, max_position_embeddings=64))
    minift.load_adapter(base, out)
    assert base.config.max_position_embeddings == 256
    assert base.config.rope_scaling["rope_type"] == "yarn"
