"""minift/models/attention.py: flex_block_mask builds its BlockMask from per-block summaries. The
block tables must equal create_block_mask's (which evaluates mask_mod on the dense grid), the pairs
the kernel attends (every pair of a full block, mask_mod's inside a partial one) must equal the
dense SDPA mask, and no tensor of O(T^2) may be made. Eager flex on CPU reads only mask_mod, not
the block tables, so the tables are checked through the block-expanded mask."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import _rows  # segment ids from per-row sample lengths
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minift.models.attention import attend, attention_mask_4d, flex_attend, flex_block_mask

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _blocks(num, idx, bs, t):
    """(B, H, Nq) counts and (B, H, Nq, Nk) indices -> (B, H, T, T) bool, True inside the blocks."""
    dense = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, compute_q_blocks=False).to_dense()
    return dense.bool().repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :t, :t]


def _kernel_mask(block):
    """The pairs flex's kernel attends under `block`: every pair of a full block, and mask_mod's
    pairs inside a partial one."""
    t, bs = block.seq_lengths[0], block.BLOCK_SIZE[0]
    partial = _blocks(block.kv_num_blocks, block.kv_indices, bs, t)
    full = _blocks(block.full_kv_num_blocks, block.full_kv_indices, bs, t)
    assert not (partial & full).any()  # a block is one or the other
    pairs = create_mask(block.mask_mod, block.kv_indices.shape[0], 1, t, t, device="cpu")
    return full | (partial & pairs)


def _check(b, t, valid, seg, window, bs, exact=True):
    block = flex_block_mask(b, t, valid, seg, window, device="cpu", block_size=bs)
    pos = torch.arange(t)
    dense = attention_mask_4d(pos, pos, valid, seg, seg, window)
    got = _kernel_mask(block)
    assert torch.equal(got, dense.expand_as(got))
    assert block.seq_lengths == (t, t) and block.BLOCK_SIZE == (bs, bs)
    per_row = valid is not None or seg is not None
    ref = create_block_mask(block.mask_mod, b if per_row else None, None, t, t, device="cpu",
                            BLOCK_SIZE=bs)
    if exact:
        for name in TABLES:
            mine, theirs = getattr(block, name), getattr(ref, name)
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    else:  # only ever more partial blocks than create_block_mask; the same full ones
        assert not (ref.to_dense().bool() & ~block.to_dense().bool()).any()
        for name in ("full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(block, name), getattr(ref, name)), name
    return block


@settings(max_examples=40, deadline=None)
@given(data=st.data(), bs=st.sampled_from([16, 32]), t=st.integers(1, 200), b=st.integers(1, 3),
       window=st.sampled_from([None, 1, 2, 7, 16, 31, 33, 63, 100]), padded=st.booleans(),
       packed=st.booleans())
def test_block_tables_equal_create_block_mask(data, bs, t, b, window, padded, packed):
    seg = valid = None
    if packed:  # contiguous samples of random lengths, padding at the end of some rows
        rows = data.draw(st.lists(st.lists(st.integers(1, 80), min_size=0, max_size=6),
                                  min_size=b, max_size=b))
        seg = _rows(rows, t)
        valid = seg > 0 if data.draw(st.booleans()) else None
    if padded:  # padding anywhere (holes too), on its own or over the packed rows
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
        holes = torch.rand(b, t, generator=gen) < data.draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
        valid = ~holes if valid is None else valid & ~holes
    _check(b, t, valid, seg, window, bs)


@pytest.mark.parametrize("t,bs", [(128, 32), (130, 32), (40, 16), (17, 16), (1, 16)])
def test_edges(t, bs):
    # lengths at, one past and below a block; one sample across the whole row; all padding
    for window in (None, 1, bs, bs + 1, 2 * bs - 1, 2 * bs, t):  # 2 * bs - 1: just full
        _check(1, t, None, None, window, bs)
        _check(2, t, torch.ones(2, t, dtype=torch.bool), torch.ones(2, t, dtype=torch.long),
               window, bs)
        _check(1, t, torch.zeros(1, t, dtype=torch.bool), torch.zeros(1, t, dtype=torch.long),
               window, bs)
        left = torch.arange(t)[None] >= t // 3  # left padding
        _check(1, t, left, None, window, bs)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), t=st.integers(1, 120), ids=st.integers(1, 4),
       window=st.sampled_from([None, 5, 40]))
def test_scattered_sample_ids_are_kept_conservatively(seed, t, ids, window):
    # Ids that recur after other ids are not what packing makes; the mask must still be right,
    # with at most some empty blocks kept as partial ones.
    seg = torch.randint(0, ids + 1, (2, t), generator=torch.Generator().manual_seed(seed))
    _check(2, t, seg > 0, seg, window, 16, exact=False)


@pytest.mark.parametrize("t,bs,window", [(64, 16, None), (77, 32, 9), (45, 16, 20)])
def test_flex_attention_equals_sdpa(t, bs, window):
    seg = _rows([[20, t - 23], [t - 10], [5, 5, 5, t - 15]], t)  # padding at the ends
    valid = seg > 0
    q = torch.randn(3, 4, t, 8)
    k, v = torch.randn(2, 3, 2, t, 8)  # GQA: 4 heads over 2
    pos = torch.arange(t)
    for segs in (None, seg):
        flex = flex_attend(q, k, v, flex_block_mask(3, t, valid, segs, window, block_size=bs))
        dense = attend(q, k, v, attention_mask_4d(pos, pos, valid, segs, segs, window))
        assert (flex - dense).abs().max() <= 1e-5  # padding queries included


class _Largest(TorchDispatchMode):
    """Records the bytes of the largest tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.nbytes = max(self.nbytes, x.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("window", [None, 4096])
def test_no_dense_mask_at_64k_tokens(window):
    b, t = 2, 65536
    seg = (torch.arange(t) // 1000 + 1).expand(b, t).clone()  # 1000-token samples
    seg[0, -3000:] = 0  # padding at the end of one row
    seg[1] = seg[1] + 7
    with _Largest() as seen:
        block = flex_block_mask(b, t, seg > 0, seg, window, device="cpu")
    # the dense (B, T, T) booleans would be 8 GiB; the block tables are (B, 512, 512) int32/64
    assert seen.nbytes <= 64 * 2**20
    # each 128-token query block sees the kv blocks of its own one or two samples
    visited = block.kv_num_blocks + block.full_kv_num_blocks
    assert visited.shape == (b, 1, t // 128) and int(visited.max()) <= 10
