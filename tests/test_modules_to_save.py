"""Modules trained whole beside LoRA (``lora_wrap(..., modules_to_save=[...])``, LongLoRA's trainable
embeddings and norms): PEFT's matching rule and file layout (peft as the oracle, both directions),
minift's own round trip, merging, checkpoints and resume, the DPO reference, QLoRA and the memory
estimate."""
import copy
import json

import pytest
import test_adapter
import torch
from safetensors.torch import load_file
from test_trainer import make_examples, tiny_llama

import minift
import minift.checkpoints.steps as ckpt
from minift.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from minift.lora.layer import find_modules_to_save, lora_layers, lora_state_dict, lora_wrap, saved_modules
from minift.lora.merging import merge_and_check
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.linear import quantize_model
from minift.objectives.reference import AdapterReference
from minift.training.config import TrainConfig
from minift.training.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = [["embed_tokens", "norm"], ["norm"], ["input_layernorm"], ["lm_head"], ["embed_tokens", "lm_head"]]
# the tiny Hugging Face Llama and the token ids of the adapter tests (fixtures, bound here for pytest)
base, ids = test_adapter.base, test_adapter.ids


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def perturb(model, std=0.3):
    """Every trainable tensor moved (B included), as training would."""
    torch.manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


def peft_saved(model):
    """The names peft wrapped in a ModulesToSaveWrapper, without peft's prefix."""
    wrapper = peft.utils.other.ModulesToSaveWrapper
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, wrapper))


@pytest.mark.parametrize("keys", KEYS)
def test_modules_are_chosen_as_peft_chooses_them(base, keys):
    mine = find_modules_to_save(base, keys)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=keys))
    assert sorted(mine) == peft_saved(theirs)
    if keys == ["norm"]:  # a plain string suffix: every *norm module, the final one included
        assert len(mine) == 2 * 2 + 1 and "model.norm" in mine


@pytest.mark.parametrize("keys", KEYS)
def test_minift_adapter_loads_in_peft_with_the_same_logits(base, ids, tmp_path, keys):
    model = perturb(lora_wrap(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                              modules_to_save=keys))
    minift.save_adapter(model, tmp_path)
    expected = logits(model, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-2
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == keys


def test_files_have_peft_keys_config_and_shapes(base, tmp_path):
    keys = ["embed_tokens", "norm"]
    model = lora_wrap(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj"], modules_to_save=keys)
    minift.save_adapter(model, tmp_path / "minift")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=keys))
    theirs.save_pretrained(tmp_path / "peft")
    a, b = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("minift", "peft"))
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert "base_model.model.model.embed_tokens.weight" in a
    configs = [json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("minift", "peft")]
    assert configs[0]["modules_to_save"] == configs[1]["modules_to_save"] == keys
    # the saved modules' values are the trained ones (a fresh wrap: the base's)
    torch.testing.assert_close(a["base_model.model.model.norm.weight"], base.model.norm.weight)


def test_peft_adapter_with_modules_to_save_loads_in_minift(base, ids, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "norm"]))
    perturb(theirs).eval()
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, ids)
    model = minift.load_adapter(copy.deepcopy(base), tmp_path)
    assert len(saved_modules(model)) == 6
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_round_trip_into_a_fresh_and_a_wrapped_base(base, ids, tmp_path):
    model = perturb(lora_wrap(copy.deepcopy(base), r=4, alpha=8, modules_to_save=["embed_tokens", "norm"]))
    minift.save_adapter(model, tmp_path)
    fresh = minift.load_adapter(copy.deepcopy(base), tmp_path)
    wrapped = minift.load_adapter(lora_wrap(copy.deepcopy(base), r=4, alpha=8,
                                            modules_to_save=["embed_tokens", "norm"]), tmp_path)
    for other in (fresh, wrapped):
        assert torch.equal(logits(other, ids), logits(model, ids))
        assert sorted(lora_state_dict(other)) == sorted(lora_state_dict(model))
    # a wrapped model that trains other modules is refused, naming the field
    other = lora_wrap(copy.deepcopy(base), r=4, alpha=8, modules_to_save=["norm"])
    with pytest.raises(ValueError, match=r"adapter_config\.json: modules_to_save=\['embed_tokens', 'norm'\]"):
        minift.load_adapter(other, tmp_path)


def test_only_lora_and_the_saved_modules_train(base):
    model = lora_wrap(copy.deepcopy(base), r=4, alpha=8, modules_to_save=["embed_tokens", "norm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = {n for n in trainable if "lora_" not in n}
    assert saved == {"model.embed_tokens.weight", "model.norm.weight",
                     *(f"model.layers.{i}.{k}.weight" for i in range(2)
                       for k in ("input_layernorm", "post_attention_layernorm"))}
    assert not model.lm_head.weight.requires_grad


def test_bad_keys_are_one_line_errors_naming_them(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"modules_to_save: 'embedding' matches no module"):
        lora_wrap(model, modules_to_save=["embedding"])
    assert not lora_layers(model) and not hasattr(model, "_minift_lora")  # refused before any change
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is \(or holds\).*LoRA target"):
        lora_wrap(copy.deepcopy(base), target_modules=["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(ValueError, match=r"'model.rotary_emb' has no floating-point parameters"):
        lora_wrap(copy.deepcopy(base), modules_to_save=["rotary_emb"])
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        lora_wrap(copy.deepcopy(base), modules_to_save=[""])


def test_tied_embeddings_are_refused_naming_both():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                              torch_dtype="float32"))
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is tied to 'lm_head.weight'"):
        lora_wrap(model, modules_to_save=["embed_tokens"])
    assert not lora_layers(model)


def _minift_base():
    torch.manual_seed(5)
    return tiny_llama().eval()


def test_merge_takes_the_trained_modules(tmp_path):
    ids = torch.randint(0, 64, (2, 9))
    model = perturb(lora_wrap(_minift_base(), r=4, alpha=8, modules_to_save=["embed_tokens", "norm"]))
    trained_embed = model.model.embed_tokens.weight.detach().clone()
    minift.save_adapter(model, tmp_path)
    expected = logits(model, ids)
    assert (expected - logits(_minift_base(), ids)).abs().max() > 1e-2
    merged, report = merge_and_check(model, [ids[0]])
    assert report["merge_error"] <= report["tolerance"]
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.model.embed_tokens.weight, trained_embed)
    assert not saved_modules(merged) and not any(p.requires_grad for p in merged.parameters())
    # a fresh base with the adapter loaded and merged is the same model
    again = minift.merge_lora(minift.load_adapter(_minift_base(), tmp_path))
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-5, atol=1e-5)


def test_adapters_off_is_refused_when_modules_are_trained_in_place(base):
    model = lora_wrap(copy.deepcopy(base), r=4, alpha=8, modules_to_save=["norm"])
    with pytest.raises(ValueError, match=r"disable_adapters: the model trains modules_to_save in place"):
        with minift.disable_adapters(model):
            pass
    with pytest.raises(ValueError, match=r"AdapterReference: .*modules_to_save"):
        AdapterReference(model)


def test_qlora_trains_embeddings_and_norms_but_not_a_4bit_head():
    torch.manual_seed(0)
    model = lora_wrap(quantize_model(tiny_llama()), r=4, alpha=8, modules_to_save=["embed_tokens", "norm"])
    assert model.model.embed_tokens.weight.requires_grad and model.model.norm.weight.requires_grad
    with pytest.raises(ValueError, match=r"'lm_head' is \(or holds\) 'lm_head'.*4-bit"):
        lora_wrap(quantize_model(tiny_llama(), skip=()), modules_to_save=["lm_head"])


def _crash_then_resume(tmp_path):
    data = make_examples(24, vocab=32, seed=3)
    settings = dict(method="lora", learning_rate=3e-2, micro_batch_size=4, bf16=False, progress=False,
                    keep_last=None, max_steps=4, save_interval=2)

    def model(crash_at=None):
        torch.manual_seed(0)
        m = lora_wrap(tiny_llama(), r=4, alpha=8, modules_to_save=["embed_tokens", "norm"])
        if crash_at is not None:
            calls = []

            def hook(module, args):
                calls.append(1)
                if module.training and len(calls) == crash_at:
                    raise KeyboardInterrupt("simulated crash")
            m.register_forward_pre_hook(hook)
        return m

    whole = model()
    start = whole.model.embed_tokens.weight.detach().clone()
    train(whole, data, TrainConfig(output_dir=str(tmp_path / "whole"), **settings))
    with pytest.raises(KeyboardInterrupt):
        train(model(crash_at=3), data, TrainConfig(output_dir=str(tmp_path / "part"), **settings))
    resumed = model()
    train(resumed, data, TrainConfig(output_dir=str(tmp_path / "part"), resume_from="latest", **settings))
    return whole, resumed, start


def test_training_checkpoints_and_resume_carry_the_saved_modules(tmp_path):
    whole, resumed, start = _crash_then_resume(tmp_path)
    assert not torch.equal(whole.model.embed_tokens.weight, start)  # trained
    saved = ckpt.load_file(str(tmp_path / "part" / "step-2" / "model.safetensors"))
    assert "model.embed_tokens.weight" in saved and "model.norm.weight" in saved
    assert "lm_head.weight" not in saved  # the frozen base stays out of adapter checkpoints
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_estimate_counts_the_saved_modules_as_trainable():
    kw = dict(batch_size=1, seq_len=32, device="cpu", dtype=torch.float32)
    plain = minift.estimate_memory("tiny", "lora", **kw)
    saved = minift.estimate_memory("tiny", "lora", modules_to_save=["embed_tokens", "norm"], **kw)
    model = Llama(ModelConfig.from_name("tiny"))
    chosen = [p for n, p in model.named_parameters()
              if n.startswith("model.embed_tokens.") or n.endswith("norm.weight")]
    extra = sum(p.numel() * p.element_size() for p in chosen)
    assert saved.trainable_params - plain.trainable_params == extra
    assert saved.gradients - plain.gradients == extra
    # torch's AdamW: two moments and a float32 step count per parameter tensor
    assert saved.optimizer_states - plain.optimizer_states == 2 * extra + 4 * len(chosen)
    assert saved.frozen_weights == plain.frozen_weights - extra
    assert saved.settings["modules_to_save"] == ["embed_tokens", "norm"]
    with pytest.raises(ValueError, match="modules_to_save applies to method='lora' or 'qlora'"):
        minift.estimate_memory("tiny", "full", modules_to_save=["norm"], **kw)


def test_train_llama_flag_wraps_with_modules_to_save(tmp_path):
    import importlib.util
    from pathlib import Path

    script_path = Path(__file__).resolve().parents[1] / "examples" / "train_llama.py"
    spec = importlib.util.spec_from_file_location("train_llama_mts", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--device", "cpu", "--modules-to-save", "embed_tokens, norm"])
    _, model = script.load_base(args, torch.device("cpu"))
    names = [n for n, _ in saved_modules(model)]
    assert names[:2] == ["model.embed_tokens", "model.layers.0.input_layernorm"]
    assert len(names) == 2 + 2 * model.config.num_hidden_layers
    bad = [(["--modules-to-save", "embedding"], r"--modules-to-save 'embedding': .*matches no module"),
           (["--modules-to-save", "norm", "--method", "full"], r"--method full trains every module")]
    for flags, match in bad:
        with pytest.raises(script.UsageError, match=match):
            script.load_base(script.parse_args(["--device", "cpu", *flags]), torch.device("cpu"))
