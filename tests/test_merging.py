"""minift/lora/merging.py: the post-merge logit check, and which base an NF4 adapter is merged into."""
import copy

import pytest
import torch
from torch import nn

import minift
from minift.lora.layer import lora_layers
from minift.lora.merging import describe, merge_and_check
from minift.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)


def trained_lora(model):
    model = minift.lora_wrap(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def samples():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (9,), generator=g), torch.randint(0, 64, (2, 5), generator=g)]


@torch.no_grad()
def logits_of(model, inputs):
    return [model(x.unsqueeze(0) if x.dim() == 1 else x).float() for x in inputs]


def test_lora_merge_reports_the_difference_it_measured():
    model = trained_lora(minift.Llama(CFG))
    want = logits_of(model.eval(), samples())
    merged, report = merge_and_check(model, samples())
    assert not lora_layers(merged) and report["merged_into"] == "weights"
    got = logits_of(merged, samples())
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert report["max_abs_logit_diff"] == pytest.approx(diff, abs=1e-7)
    assert report["max_abs_logit_diff"] < 1e-4 and report["samples"] == 2
    assert "the base weights" in describe(report)


def forget_the_scale(model, monkeypatch):
    # a merge that forgets the scale (a real bug class: alpha / r applied twice or not at all)
    for _, layer in lora_layers(model):
        monkeypatch.setattr(layer, "delta_weight",
                            lambda layer=layer: layer.lora_B.weight.float() @ layer.lora_A.weight.float())


def test_a_wrong_merge_fails_naming_the_difference_and_the_base(monkeypatch):
    model = trained_lora(minift.Llama(CFG))
    forget_the_scale(model, monkeypatch)
    with pytest.raises(ValueError, match=r"merge check failed: merged into weights \(float32\), .* differ "
                                         r"from the unmerged model's by [0-9.e-]+ on 2 sample\(s\), over "
                                         r"the tolerance [0-9.e-]+"):
        merge_and_check(model, samples())


def test_the_tolerance_defaults_by_dtype_and_can_be_given(monkeypatch):
    model = trained_lora(minift.Llama(CFG))
    _, report = merge_and_check(copy.deepcopy(model), samples())
    assert report["dtype"] == "float32"
    assert report["tolerance"] == pytest.approx(1e-4 * max(1.0, report["max_logit"]))
    assert report["merge_error"] <= report["tolerance"]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    _, report16 = merge_and_check(bf16, samples())
    assert report16["dtype"] == "bfloat16"
    assert report16["tolerance"] == pytest.approx(5e-2 * max(1.0, report16["max_logit"]))
    forget_the_scale(model, monkeypatch)
    _, loose = merge_and_check(copy.deepcopy(model), samples(), tolerance=float("inf"))
    assert loose["merge_error"] > 1e-3
    with pytest.raises(ValueError, match="over the tolerance 1e-09"):
        merge_and_check(model, samples(), tolerance=1e-9)


def nf4_model():
    torch.manual_seed(3)
    full = minift.Llama(CFG)
    originals = {k: v.clone() for k, v in full.state_dict().items()}
    model = trained_lora(minift.quantize_model(copy.deepcopy(full)))
    return model, originals


def test_nf4_merges_into_the_dequantized_weights_by_default():
    model, _ = nf4_model()
    name, layer = lora_layers(model)[0]
    want_w = layer.base_layer.dequantize(torch.float32).float() + layer.delta_weight()
    merged, report = merge_and_check(model, samples())
    assert report["merged_into"] == "dequantized_nf4"
    torch.testing.assert_close(merged.get_submodule(name).weight.float(), want_w, rtol=0, atol=1e-6)
    assert report["max_abs_logit_diff"] < 1e-4
    assert "dequantized 4-bit" in describe(report)


def test_nf4_into_original_weights_moves_the_logits_and_says_so(tmp_path):
    model, originals = nf4_model()
    other = copy.deepcopy(model)
    name, layer = lora_layers(model)[0]
    want_w = originals[f"{name}.weight"].float() + layer.delta_weight()
    merged, report = merge_and_check(model, samples(), base_weights=originals)
    assert report["merged_into"] == "original_weights"
    torch.testing.assert_close(merged.get_submodule(name).weight.float(), want_w, rtol=0, atol=1e-6)
    _, default = merge_and_check(other, samples())
    # the adapter corrected W_nf4, not W: merging into W moves the logits by the quantization error
    assert report["max_abs_logit_diff"] > 10 * default["max_abs_logit_diff"]
    # ... while the merge itself is exact up to rounding: checked against the unmerged adapter
    # on the original weights, so shipping the original-weight merge does not raise
    assert report["merge_error"] < 1e-4 < report["max_abs_logit_diff"]
    assert "original 16-bit" in describe(report)


def test_original_weights_from_a_checkpoint_and_errors(tmp_path):
    torch.manual_seed(3)
    full = minift.Llama(CFG)
    minift.save_model(full, tmp_path / "ckpt")
    model = trained_lora(minift.quantize_model(copy.deepcopy(full)))
    name, layer = lora_layers(model)[0]
    want_w = full.get_submodule(name).weight.float() + layer.delta_weight()
    merged, report = merge_and_check(copy.deepcopy(model), samples(), base_weights=tmp_path / "ckpt")
    torch.testing.assert_close(merged.get_submodule(name).weight.float(), want_w, rtol=0, atol=1e-6)
    partial = {k: v for k, v in full.state_dict().items() if "q_proj" not in k}
    with pytest.raises(ValueError, match="no original weight for 'model.layers.0.self_attn.q_proj'"):
        merge_and_check(copy.deepcopy(model), samples(), base_weights=partial)
    with pytest.raises(ValueError, match="only for an NF4 base"):
        merge_and_check(trained_lora(minift.Llama(CFG)), samples(), base_weights=partial)
    with pytest.raises(ValueError, match="at least one held-out sample"):
        merge_and_check(model, [])
    assert isinstance(merged.get_submodule(name), nn.Linear)


def test_the_check_runs_on_what_is_saved():
    # the merged model is cast to the dtype it is saved in before its logits are compared
    model = trained_lora(minift.Llama(CFG))
    merged, report = merge_and_check(model, samples(), dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert report["dtype"] == "bfloat16"
    assert 1e-4 < report["merge_error"] <= report["tolerance"]  # bf16 rounding, within bf16's bound
