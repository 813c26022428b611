"""minift/nf4/fsdp.py on one process: the one-parameter NF4 layout, its round trip and its layer.

The sharded all-gather itself is tested by tests/test_distributed.py (2 gloo processes).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minift
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.fsdp import ShardedNF4Linear, pack_bytes, shardable_nf4, unpack_bytes
from minift.nf4.linear import NF4Linear
from minift.nf4.quantize import quantize_nf4


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), blocksize=st.sampled_from([32, 64, 256]),
       double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_is_exact(rows, cols, blocksize, double_quant, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = quantize_nf4(w, blocksize, double_quant)
    flat, layout = pack_bytes(q)
    expected = sum(t.nbytes for t in (q.packed, q.absmax, q.nested_absmax) if t is not None)
    assert flat.dtype == torch.uint8 and flat.shape == (expected,)
    assert layout[0][1] == torch.float32  # fp32 scales first: byte offset 0 stays 4-aligned
    back = unpack_bytes(flat, layout, q)
    for name in ("packed", "absmax", "nested_absmax"):
        a, b = getattr(q, name), getattr(back, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape)
    assert torch.equal(minift.dequantize_nf4(back), minift.dequantize_nf4(q))


def test_unpack_reads_a_view_at_an_odd_offset():
    # a gathered parameter may be a view into a bigger buffer at any byte offset
    q = quantize_nf4(torch.randn(8, 64), 64, True)
    flat, layout = pack_bytes(q)
    buffer = torch.cat([torch.zeros(3, dtype=torch.uint8), flat])
    back = unpack_bytes(buffer[3:], layout, q)
    assert torch.equal(minift.dequantize_nf4(back), minift.dequantize_nf4(q))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_sharded_layer_matches_nf4_linear(double_quant, bias):
    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(24, 40), torch.randn(24) if bias else None, 64, double_quant)
    sharded = ShardedNF4Linear(layer)
    assert [n for n, _ in sharded.named_parameters()] == ["nf4_bytes"] + (["bias"] if bias else [])
    assert not sharded.nf4_bytes.requires_grad and sharded.nf4_bytes.dtype == torch.uint8
    x = torch.randn(3, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = layer(x), sharded(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(sharded.weight, layer.weight)  # the packed codes, as NF4Linear.weight
    back = sharded.to_nf4_linear()
    assert torch.equal(back.dequantize(), layer.dequantize())
    assert back.state_dict().keys() == layer.state_dict().keys()  # bitsandbytes names again


def test_dtype_casts_leave_the_quantized_bytes_and_code_books_alone():
    layer = ShardedNF4Linear(NF4Linear.from_weight(torch.randn(16, 64)))
    want = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.nf4_bytes.dtype == torch.uint8 and layer.weight_quant_map.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), want)


def test_shardable_nf4_converts_every_nf4_layer_once():
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny"))
    minift.quantize_model(model)
    minift.lora_wrap(model, r=2, alpha=4)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        want = model(ids)
    assert shardable_nf4(model) == 14  # 7 linears in each of 2 layers
    assert shardable_nf4(model) == 0
    assert all(isinstance(m.base_layer, ShardedNF4Linear) for _, m in minift.lora.layer.lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    # trainability is unchanged: only the adapters
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
