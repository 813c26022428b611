"""NF4Linear outside autograd (minift.nf4.inference): the same values as the training forward, the
opt-in cache of dequantized weights, and decoding with an unmerged LoRA adapter."""
import copy

import pytest
import torch

from minift.lora.layer import lora_layers, lora_wrap, merge_lora
from minift.models.config import ModelConfig
from minift.models.generation import generate
from minift.models.llama import Llama
from minift.nf4.inference import nf4_inference_cache, scratch_bytes
from minift.nf4.linear import NF4Linear, quantize_model


def _layer(out=96, inp=128, bias=True):
    torch.manual_seed(0)
    return NF4Linear.from_weight(torch.randn(out, inp), torch.randn(out) if bias else None)


@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (3, torch.bfloat16), (40, torch.float32)])
def test_no_grad_forward_has_the_training_forwards_bits(rows, dtype):
    layer = _layer()
    x = torch.randn(rows, 128).to(dtype)
    want = layer(x.clone().requires_grad_(True)).detach()  # through NF4MatMul
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert scratch_bytes() >= 96 * 128 * 2  # the small-M path reused a buffer (bf16 at least)


def test_generation_drops_the_scratch_buffer_when_it_ends():
    model = quantize_model(_tiny_llama())
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # a no-grad forward of 3 rows fills the scratch
    assert scratch_bytes() > 0
    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert scratch_bytes() == 0


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Llama(config).eval()


def test_cache_reports_its_bytes_gives_the_same_tokens_and_is_dropped_on_exit():
    model = quantize_model(_tiny_llama())
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    plain = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    with nf4_inference_cache(model) as report:
        assert report["layers"] == len(layers) == 14
        assert report["bytes"] == sum(4 * m.in_features * m.out_features for m in layers)
        assert report["dtype"] == {"float32": 14}
        with torch.no_grad():
            x = torch.randn(3, 64)
            assert torch.equal(layers[0](x), torch.nn.functional.linear(x, layers[0].dequantize()))
        cached = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(plain, cached)
    assert all(m._inference_weight is None for m in layers)


def test_gradients_inside_the_cache_are_the_training_ones():
    layer = _layer(bias=False)
    x = torch.randn(4, 128)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(x1).square().sum().backward()
    with nf4_inference_cache(layer):
        layer(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_unmerged_adapter_decodes_the_merged_tokens():
    # decoding with LoRA applied unmerged (the default) gives the tokens of the adapter folded in
    model = _tiny_llama(seed=2)
    lora_wrap(model, r=4, alpha=8)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    merged = merge_lora(copy.deepcopy(model))
    assert not lora_layers(merged)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(model, ids, max_new_tokens=8, eos_token_id=[]),
                       generate(merged, ids, max_new_tokens=8, eos_token_id=[]))
