"""minift/models/attention.py: FlexAttention block masks against the dense SDPA masks, and which path a
batch takes. torch has no CPU FlexAttention backward, so the flex path is checked forward here
(its eager reference on CPU); on CUDA the model takes it for training."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask

from minift.models.attention import attend, attention_mask_4d, batch_mask, flex_attend, flex_block_mask
from minift.models.config import ModelConfig
from minift.models.llama import Llama

# bf16 keeps 8 bits of mantissa: outputs of magnitude <= 4 round to within 2**-6; the two paths
# also sum in different orders, so bf16 comparisons allow 3e-2, fp32 ones 1e-5.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _rows(draw_lengths, t):
    """segment_ids (B, T) from per-row sample lengths; the rest of a row is padding (0)."""
    seg = torch.zeros(len(draw_lengths), t, dtype=torch.long)
    for b, lengths in enumerate(draw_lengths):
        pos = 0
        for i, n in enumerate(lengths, start=1):
            seg[b, pos:pos + n] = i
            pos += n
    return seg


@pytest.mark.slow  # eager CPU flex: ~10 s of one-time warm-up, then ~0.3 s a call
@settings(max_examples=5, deadline=None)
@given(rows=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=3),
       packed=st.booleans(), window=st.sampled_from([None, 3, 7]), kv=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_flex_equals_dense_mask(rows, packed, window, kv, dtype):
    t = max(sum(r) for r in rows) + 2  # at least two padding slots in every row
    seg = _rows(rows, t)
    valid = seg > 0
    b, h, d = len(rows), 4, 16
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = torch.randn(2, b, kv, t, d, dtype=dtype)
    segs = seg if packed else None
    pos = torch.arange(t)
    dense = attend(q, k, v, attention_mask_4d(pos, pos, valid, segs, segs, window))
    flex = flex_attend(q, k, v, flex_block_mask(b, t, valid, segs, window))
    assert flex.dtype == dtype and flex.shape == (b, h, t, d)
    assert (flex.float() - dense.float()).abs().max() <= TOL[dtype]  # padding queries included


def _configs():
    tiny = ModelConfig.from_name("tiny")  # 4 heads over 2 KV heads: GQA
    windowed = ModelConfig(model_type="mistral", vocab_size=256, hidden_size=64,
                           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, sliding_window=5)
    return {"gqa": tiny, "window": windowed}


@pytest.mark.slow  # four model forwards through eager CPU flex per case
@pytest.mark.parametrize("name,dtype", [("gqa", torch.float32), ("window", torch.bfloat16)])
def test_model_flex_path_equals_dense_path(name, dtype):
    model = Llama(_configs()[name]).to(dtype).eval()
    ids = torch.randint(0, 256, (2, 14))
    seg = _rows([[6, 5], [9]], 14)  # row 0: two packed samples; row 1: one sample + padding
    pos = torch.cat([torch.arange(6), torch.arange(5), torch.zeros(3, dtype=torch.long)])
    pos = torch.stack([pos, torch.cat([torch.arange(9), torch.zeros(5, dtype=torch.long)])])
    batches = {"padded": dict(attention_mask=(seg > 0).long()),
               "packed": dict(attention_mask=(seg > 0).long(), segment_ids=seg, position_ids=pos)}
    valid = seg > 0
    for kwargs in batches.values():
        with torch.no_grad():
            model.attention_impl = "sdpa"
            dense = model(ids, **kwargs)
            model.attention_impl = "flex"
            flex = model(ids, **kwargs)
        scale = dense.float().abs().max()
        assert ((flex.float() - dense.float())[valid].abs().max() / scale) <= TOL[dtype]


def test_packed_rows_and_windows_cost_linear_in_length():
    # Samples of 128 tokens packed back to back: each query block sees its own sample's block
    # (and the diagonal), so the visited blocks double when T doubles; plain causal quadruples.
    def visited(t, packed=False, window=None):
        seg = (torch.arange(t) // 128 + 1)[None] if packed else None
        return int(flex_block_mask(1, t, None, seg, window).kv_num_blocks.sum())

    assert visited(2048, packed=True) == 2 * visited(1024, packed=True) == 2 * 1024 // 128
    assert visited(2048, window=256) <= 2 * visited(1024, window=256) + 3
    assert visited(2048) == 4 * visited(1024) - 2048 // 128 // 2 * 2  # n(n+1)/2 blocks, n = T/128


def test_which_path_a_batch_takes():
    ones, t = torch.ones(2, 6, dtype=torch.long), 6
    padded = ones.clone()
    padded[1, 4:] = 0
    seg = torch.ones(2, 6, dtype=torch.long)
    cpu = torch.device("cpu")

    def path(t, past, attention_mask, segment_ids, window, use_flex=True):
        return batch_mask(t, past, attention_mask, segment_ids, window, cpu, use_flex)

    assert path(t, 0, None, None, None) is None  # plain causal: is_causal
    assert path(t, 0, ones, None, None) is None  # all ones, read on the host
    assert isinstance(path(t, 0, padded, None, None), BlockMask)
    assert isinstance(path(t, 0, ones, seg, None), BlockMask)
    assert isinstance(path(t, 0, None, None, 4), BlockMask)  # the window cuts
    assert path(t, 0, None, None, 6) is None  # the window is as long as the batch
    dense = path(t, 0, padded, None, None, False)
    assert dense.shape == (2, 1, 6, 6) and not dense[1, 0, 5, 4] and dense[1, 0, 3, 2]
    # decoding after a cache always uses the dense mask: one query row per step
    step = path(1, 5, ones, None, None)
    assert isinstance(step, torch.Tensor) and step.shape == (2, 1, 1, 6)
    # a mask on the device is never read: its all-ones values would have to be fetched (the
    # meta device has no values, so any read would raise)
    meta = batch_mask(t, 0, ones.to("meta"), None, None, torch.device("meta"), use_flex=False)
    assert meta.shape == (2, 1, 6, 6) and meta.device.type == "meta"


def test_bad_attention_impl_is_named():
    model = Llama(ModelConfig.from_name("tiny"))
    model.attention_impl = "flash"
    with pytest.raises(ValueError, match="Llama.attention_impl must be one of auto, sdpa, flex, got 'flash'"):
        model(torch.zeros(1, 3, dtype=torch.long))
