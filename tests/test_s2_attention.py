"""Shifted sparse attention (S²-Attn, LongLoRA §3.2): minift/models/attention.py's dense and flex
masks against a per-head reference, LongLoRA's rolled groups, create_block_mask's tables, the
work and memory it costs, the model's training-only switch and the training loop's field."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_block_mask import _Largest
from test_trainer import make_examples, tiny_llama
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from minift.models.attention import (
    attend,
    attention_mask_4d,
    batch_mask,
    flex_attend,
    flex_block_mask,
    s2_group_size,
)
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.planning.estimate import estimate_memory
from minift.training.config import TrainConfig
from minift.training.loop import train

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _reference(q, k, v, group):
    """S²-Attn by explicit loops: per head, the row cut into its groups ([0, G), [G, 2G), ... for
    heads [0, H//2); [0, G - G//2), [G - G//2, 2G - G//2), ... for the others), and within each
    group every query attends causally to the keys of its group."""
    b, h, t, d = q.shape
    per = h // k.shape[1]  # query heads per KV head
    out = torch.zeros_like(q)
    for head in range(h):
        first = group - group // 2 if head >= h // 2 else group
        cuts = [0] + list(range(first, t, group)) + [t]
        kh, vh = k[:, head // per], v[:, head // per]
        for start, end in zip(cuts, cuts[1:]):
            for i in range(start, end):
                scores = kh[:, start:i + 1] @ q[:, head, i, :, None] / math.sqrt(d)  # (B, n, 1)
                weights = torch.softmax(scores[..., 0], -1)
                out[:, head, i] = (weights[..., None] * vh[:, start:i + 1]).sum(1)
    return out


@pytest.mark.parametrize("t,group,heads,kv", [
    (16, 4, 4, 2),   # GQA, T a multiple of G
    (13, 6, 4, 1),   # MQA: the halves split the one KV head's queries; T not a multiple of G
    (20, 8, 6, 3),   # three query heads in each half, one of them sharing a KV head across
    (10, 3, 4, 4),   # odd G: shifted by 1
    (7, 20, 4, 2),   # G longer than the row: unshifted heads are plain causal
    (9, 2, 3, 3),    # odd head count: one unshifted head, two shifted
])
def test_dense_and_flex_paths_equal_the_per_head_reference(t, group, heads, kv):
    q = torch.randn(2, heads, t, 8)
    k, v = torch.randn(2, 2, kv, t, 8)
    pos = torch.arange(t)
    want = _reference(q, k, v, group)
    dense = attend(q, k, v, attention_mask_4d(pos, pos, s2_group=group))
    flex = flex_attend(q, k, v, flex_block_mask(1, t, s2_group=group, heads=heads, device="cpu",
                                                block_size=4))
    assert (dense - want).abs().max() <= 1e-5
    assert (flex - want).abs().max() <= 1e-5


def test_the_pairs_are_longlora_s_rolled_groups_without_the_wrap():
    # LongLoRA's roll-based path (and the paper's pseudocode) rolls the shifted heads' tokens by
    # -G/2, attends causally within groups of the rolled row and rolls back: its last group holds
    # the row's last G/2 tokens followed by its first G/2, so those first tokens see the last
    # ones -- future tokens. minift keeps every other pair of it and drops exactly those.
    t, group = 32, 8
    s = group // 2
    pos = torch.arange(t)
    ours = attention_mask_4d(pos, pos, s2_group=group)[0]  # (2, T, T)
    rolled = (pos - s) % t  # where each position lands after the roll by -G/2
    for half, where in ((0, pos), (1, rolled)):
        same = where[:, None] // group == where[None, :] // group
        theirs = same & (where[None, :] <= where[:, None])  # causal in the rolled order
        wrap = (pos[:, None] < s) & (pos[None, :] >= t - s) if half else torch.zeros_like(theirs)
        assert torch.equal(ours[half], theirs & ~wrap)
        assert not (ours[half] & (pos[None, :] > pos[:, None])).any()  # causal
    assert int(wrap.sum()) == s * s  # the dropped pairs: first half-group x last half-group


def _kernel_pairs(block: BlockMask, heads: int):
    """(B, H, T, T): every pair of a full block, and mask_mod's pairs inside a partial one."""
    t, bs = block.seq_lengths[0], block.BLOCK_SIZE[0]

    def expand(num, idx):
        dense = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, compute_q_blocks=False).to_dense()
        return dense.bool().repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :t, :t]

    partial = expand(block.kv_num_blocks, block.kv_indices)
    full = expand(block.full_kv_num_blocks, block.full_kv_indices)
    assert not (partial & full).any()
    pairs = create_mask(block.mask_mod, block.kv_indices.shape[0], heads, t, t, device="cpu")
    return full | (partial & pairs)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 150), group=st.integers(2, 70), bs=st.sampled_from([8, 16]),
       heads=st.sampled_from([2, 3, 4]), b=st.integers(1, 2), padded=st.booleans(),
       window=st.sampled_from([None, 5, 40]), seed=st.integers(0, 2**31))
def test_block_tables_equal_create_block_mask_per_head(t, group, bs, heads, b, padded, window, seed):
    valid = None
    if padded:  # right padding of random lengths, as bucketed batches carry
        lengths = torch.randint(1, t + 1, (b,), generator=torch.Generator().manual_seed(seed))
        valid = torch.arange(t)[None] < lengths[:, None]
    block = flex_block_mask(b, t, valid, None, window, device="cpu", block_size=bs,
                            s2_group=group, heads=heads)
    pos = torch.arange(t)
    dense = attention_mask_4d(pos, pos, valid, window=window, s2_group=group)  # (B', 2, T, T)
    per_head = dense[:, (torch.arange(heads) >= heads // 2).long()]  # (B', H, T, T)
    got = _kernel_pairs(block, heads)
    assert torch.equal(got, per_head.expand_as(got))
    ref = create_block_mask(block.mask_mod, b if padded else None, heads, t, t, device="cpu",
                            BLOCK_SIZE=bs)
    for name in TABLES:
        mine, theirs = getattr(block, name), getattr(ref, name)
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name


def _visited_pairs(t, group=None, heads=2, bs=128):
    """Pairs the flex kernel computes: every pair of each visited (query, kv) block, all heads;
    without a group, plain causal attention."""
    if group is None:
        block = flex_block_mask(1, t, device="cpu", block_size=bs)
    else:
        block = flex_block_mask(1, t, device="cpu", block_size=bs, s2_group=group, heads=heads)
    per_head = block.kv_num_blocks + block.full_kv_num_blocks  # (1, H or 1, N)
    return int(per_head.sum()) * bs * bs * heads // per_head.shape[1]


def test_flex_work_is_linear_in_length_and_in_the_group():
    heads, bs, t = 2, 128, 4096
    for group in (512, 1024):
        short, long = _visited_pairs(t, group), _visited_pairs(2 * t, group)
        # a group of n = G / bs blocks visits n (n + 1) / 2 of them: T (G + bs) / 2 pairs a head;
        # the shifted heads' half-groups at the ends of a row visit fewer
        bound = heads * t * (group + bs) // 2
        assert 0.9 * bound <= short <= bound
        # twice the length, twice the work, up to those half-groups (a constant)
        assert 2 * short <= long <= 2 * short + heads * group * group // 2
    assert _visited_pairs(2 * t) / _visited_pairs(t) > 3.8  # full causal attention quadruples


@pytest.mark.parametrize("window", [None, 4096])
def test_no_dense_mask_at_64k_tokens(window):
    t, heads = 65536, 32
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[0, -3000:] = False
    with _Largest() as seen:
        block = flex_block_mask(2, t, valid, None, window, device="cpu", s2_group=t // 4, heads=heads)
    # one (2, 2, T, T) dense mask would be 16 GiB; the per-head block tables are (2, 32, 512, 512)
    assert seen.nbytes <= 128 * 2**20
    visited = block.kv_num_blocks + block.full_kv_num_blocks
    assert visited.shape == (2, heads, t // 128)
    assert int(visited.max()) <= (window or t // 4) // 128 + 1


def test_which_path_and_shape_an_s2_batch_takes():
    cpu, t = torch.device("cpu"), 8
    # plain causal rows take a mask under S²-Attn: flex tables per head, or the dense halves
    block = batch_mask(t, 0, None, None, None, cpu, True, s2_group=4, heads=4)
    assert isinstance(block, BlockMask) and block.kv_num_blocks.shape[:2] == (1, 4)
    dense = batch_mask(t, 0, None, None, None, cpu, False, s2_group=4, heads=4)
    assert dense.shape == (1, 2, t, t)
    padded = torch.ones(2, t, dtype=torch.long)
    padded[1, 5:] = 0
    assert batch_mask(t, 0, padded, None, None, cpu, False, s2_group=4, heads=4).shape == (2, 2, t, t)
    with pytest.raises(ValueError, match="S²-Attn .* without a KV cache"):
        batch_mask(1, 5, None, None, None, cpu, False, s2_group=4, heads=4)
    with pytest.raises(ValueError, match="s2_group needs heads"):
        flex_block_mask(1, t, s2_group=4)
    assert [s2_group_size(t) for t in (1, 4, 8, 9, 4096)] == [1, 1, 2, 3, 1024]
    assert s2_group_size(4096, 256) == 256


def _config(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                torch_dtype="float32")
    return ModelConfig(**dict(base, **kw))


def test_the_model_uses_s2_in_training_forwards_only():
    torch.manual_seed(0)
    model = Llama(_config())
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        model.train()
        full = model(ids)
        model.s2_attention, model.s2_group_size = True, 8
        s2 = model(ids)
        model.attention_impl = "flex"  # the CUDA path's block mask, on flex's eager CPU reference
        s2_flex = model(ids)
        model.attention_impl = "auto"
        model.eval()  # evaluation and generation attend fully
        evaluated = model(ids)
    assert (s2_flex - s2).abs().max() <= 1e-4
    assert torch.equal(evaluated, full)
    # the first group is attended the same either way; later tokens lose the keys outside their group
    assert torch.allclose(s2[:, :4], full[:, :4], atol=1e-5)
    assert (s2[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def _run(tmp_path, name, model, data, **kw):
    config = TrainConfig(**dict(dict(method="full", learning_rate=1e-2, warmup_ratio=0.0,
                                     micro_batch_size=4, max_steps=40, bf16=False, progress=False,
                                     output_dir=str(tmp_path / name), seed=0), **kw))
    return train(model, data, config)


@pytest.mark.usefixtures("one_thread")
def test_training_loss_with_s2_is_within_5_percent_of_full_attention(tmp_path):
    # rows of 64 counting tokens: groups of 16 keep the local pattern in reach
    data = [{"input_ids": ex["input_ids"] * 8, "labels": ex["input_ids"] * 8}
            for ex in make_examples(32, vocab=64, seed=3)]
    data = [{k: v[:64] for k, v in ex.items()} for ex in data]
    torch.manual_seed(0)
    start = tiny_llama().state_dict()
    results = {}
    for name, kw in (("full", {}), ("s2", dict(s2_attention=True))):
        model = tiny_llama()
        model.load_state_dict(start)
        results[name] = _run(tmp_path, name, model, data, **kw)
        assert model.s2_attention is False  # switched off again after the run
    full, s2 = (_final_loss(tmp_path / name) for name in ("full", "s2"))
    assert full < 0.5 * results["full"]["first_loss"]  # it learned something
    assert abs(s2 - full) <= 0.05 * full, (s2, full)


def _final_loss(out, steps=10):
    """Mean loss of the run's last `steps` steps (one step's loss is one micro-batch's)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(line["loss"] for line in lines[-steps:]) / steps


def test_s2_fields_are_checked():
    bad = [
        (dict(s2_attention="yes"), TypeError, "TrainConfig.s2_attention must be True or False"),
        (dict(s2_attention=True, s2_group_size=1), ValueError,
         "TrainConfig.s2_group_size must be an integer >= 2 or None, got 1"),
        (dict(s2_group_size=64), ValueError, "s2_group_size is set, but s2_attention=False"),
        (dict(s2_attention=True, batching="pack", max_length=64), ValueError,
         "s2_attention=True groups the positions of a row.*use batching='bucket'"),
        (dict(s2_attention=True, objective="dpo"), ValueError, "s2_attention=True is for SFT"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            TrainConfig(**kwargs)
    assert TrainConfig(s2_attention=True, s2_group_size=2).s2_group_size == 2


def test_a_model_without_the_switch_is_refused(tmp_path):
    from test_trainer import TinyLM
    with pytest.raises(ValueError, match="s2_attention=True, but no module of the model has an "
                                         "'s2_attention' attribute"):
        _run(tmp_path, "tiny", TinyLM(), make_examples(8), s2_attention=True)


# ---- the planning trace of the CUDA path ------------------------------------------------------
LONG = _config(max_position_embeddings=8192)


def _activations(device, t, **kw):
    return estimate_memory(LONG, "lora", 1, t, device=device, attention_mask=False, **kw).activations


def test_traced_s2_memory_is_linear_in_length_on_cuda_and_quadratic_on_the_cpu():
    # CUDA: flex keeps the output, one log-sum-exp per row and the per-head block tables; the
    # CPU path's dense (1, 2, T, T) mask is saved per layer for backward
    cuda = [_activations("cuda", t, s2_attention=True) for t in (1024, 4096)]
    cpu = [_activations("cpu", t, s2_attention=True) for t in (1024, 4096)]
    assert cuda[1] <= 4.3 * cuda[0]
    assert cpu[1] >= 10 * cpu[0]
    # the group size does not change the memory of the CUDA path: only the work (the blocks visited)
    assert _activations("cuda", 4096, s2_attention=True, s2_group_size=256) == cuda[1]
    # and against full attention (flash: no mask), S²-Attn adds only the block tables
    full = _activations("cuda", 4096)
    assert full <= cuda[1] <= full + LONG.num_hidden_layers * 2**20


# ---- the command lines -------------------------------------------------------------------------
def test_train_llama_flags_set_the_fields():
    from test_example import _script
    script = _script()
    def config(*flags):
        args = script.parse_args(["--device", "cpu", *flags])
        args.device_type = "cpu"
        return args, script.make_config(args, pad_id=0)

    args, set_ = config("--s2-attention", "--s2-group-size", "16", "--no-group-by-length")
    assert (set_.s2_attention, set_.s2_group_size, set_.group_by_length) == (True, 16, False)
    default = config()[1]
    assert (default.s2_attention, default.s2_group_size, default.group_by_length) == (False, None, True)
    args.s2_attention = False
    with pytest.raises(script.UsageError, match=r"^--s2-group-size is set, but no --s2-attention; "
                                                r"set --s2-attention as well$"):
        script.make_config(args, pad_id=0)


def test_plan_traces_s2_and_prints_its_flags(capsys):
    from minift.__main__ import main
    assert main(["plan", "--model", "tiny", "--gpu-memory", "2GiB", "--seq-len", "128",
                 "--s2-attention", "--s2-group-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lora = out["methods"]["lora"]
    assert "s2_attention=True, s2_group_size=32" in lora["train_config"]
    assert lora["command"].endswith("--s2-attention --s2-group-size 32")
    want = estimate_memory("tiny", "lora", 1, 128, attention_mask=False, s2_attention=True,
                           s2_group_size=32)
    assert lora["asked"]["total"] == want.total
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--gpu-memory", "2GiB", "--s2-group-size", "32"])
    assert "s2_group_size is set, but s2_attention=False" in capsys.readouterr().err
