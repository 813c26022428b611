"""The fast CPU step of minift/optim/quant8.py against the reference it must equal bit for bit."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minift
from minift.optim import quant8
from minift.optim.quant8 import (
    BLOCK,
    StepScalars,
    adamw8bit_step_cpu,
    adamw8bit_step_reference,
    nearest_code,
    quantize_blockwise,
    requant_table,
)
from minift.quantmaps import dynamic_map


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    bits = bits.to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _table_lookup(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # The lookup as the step does it, written here from the table's documented contract.
    threshold, codes = requant_table(code)
    b = (y.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF
    return codes[b + 65536 * (y >= threshold[b]).to(torch.int64)]


@pytest.mark.parametrize("signed", [True, False])
def test_table_equals_the_search_at_every_split_and_midpoint(signed):
    code = dynamic_map(signed)
    threshold, _ = requant_table(code)
    splits = threshold[torch.isfinite(threshold)].view(torch.int32).to(torch.int64)
    assert splits.numel() > 200  # one split per gap between neighbouring entries, at least
    midpoints = ((code[:-1] + code[1:]) / 2).view(torch.int32).to(torch.int64)
    bits = torch.cat([splits, midpoints, code.view(torch.int32).to(torch.int64)])
    # each split, each float32 midpoint and each entry, and their neighbours 1 and 2 ulps away
    y = torch.cat([_bits_to_float(bits + d) for d in (-2, -1, 0, 1, 2)])
    y = torch.cat([y, -y])
    assert torch.equal(_table_lookup(y, code), nearest_code(y, code))


@pytest.mark.parametrize("signed", [True, False])
def test_table_equals_the_search_on_special_values(signed):
    code = dynamic_map(signed)
    tiny = torch.finfo(torch.float32).tiny
    y = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 2, -tiny / 2, 1e-45, -1e-45, 1.0, -1.0,
                      2.0, -2.0, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan])
    assert torch.equal(_table_lookup(y, code), nearest_code(y, code))


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 2**32 - 1), signed=st.booleans())
def test_table_equals_the_search_on_any_float32(start, signed):
    # 4096 consecutive bit patterns from anywhere: every sign, exponent, NaN payload
    code = dynamic_map(signed)
    y = _bits_to_float(torch.arange(start, start + 4096, dtype=torch.int64))
    assert torch.equal(_table_lookup(y, code), nearest_code(y, code))


def _states(n, gen, m_scale, v_scale, zero_block):
    m = torch.randn(n, generator=gen) * m_scale
    v = torch.rand(n, generator=gen) * v_scale
    if zero_block and n > BLOCK:
        m[:BLOCK] = 0
        v[:BLOCK] = 0
    m_codes, m_absmax = quantize_blockwise(m, dynamic_map(True))
    v_codes, v_absmax = quantize_blockwise(v, dynamic_map(False))
    return [m_codes, m_absmax, v_codes, v_absmax]


def _both(p, g, states, s, offset=0, stochastic=False):
    """(reference result, fast result): parameter and the four state tensors after one step."""
    maps = (dynamic_map(True), dynamic_map(False))
    out = []
    for step in (adamw8bit_step_reference, adamw8bit_step_cpu):
        p2, st2 = p.clone(), [t.clone() for t in states]
        step(p2, g, *st2, *maps, s, offset, stochastic)
        out.append([p2] + st2)
    return out


def _assert_same(ref, fast):
    for name, a, b in zip(("p", "m_codes", "m_absmax", "v_codes", "v_absmax"), ref, fast):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3 * 1024 + 300), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       g_dtype=st.sampled_from(["same", "float32"]), stochastic=st.booleans(),
       log_scale=st.integers(-30, 15), lr=st.sampled_from([1e-3, 0.5, 0.0]),
       weight_decay=st.sampled_from([0.0, 0.1]), step=st.integers(1, 2000),
       zero_block=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fast_step_equals_the_reference(n, dtype, g_dtype, stochastic, log_scale, lr,
                                        weight_decay, step, zero_block, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    scale = 10.0 ** log_scale  # 1e-30 (denormal products) .. 1e15 (g*g near 1e30, no inf)
    p = (torch.randn(n, generator=gen) * 3).to(dtype)
    g = (torch.randn(n, generator=gen) * scale).to(dtype if g_dtype == "same" else torch.float32)
    if dtype == torch.float16:
        g = g.clamp(-6e4, 6e4)
    states = _states(n, gen, scale, scale * scale, zero_block)
    s = StepScalars.make(lr, 0.9, 0.999, 1e-8, weight_decay, step, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant8, "CHUNK", 1024)  # several chunks and a short last one
        _assert_same(*_both(p, g, states, s, offset=BLOCK * (seed % 7), stochastic=stochastic))


@pytest.mark.parametrize("signed_gap", [0, 60, 130, 200, 254])
def test_fast_step_ties_on_midpoints_and_splits(signed_gap):
    # beta1 = 0 makes the new first moment the gradient itself; with a power-of-two absmax per
    # block, g / absmax is exact, so the requantized values sit exactly on a midpoint, on the
    # reference's split point and one ulp around them.
    code = dynamic_map(True)
    threshold, _ = requant_table(code)
    lo, hi = code[signed_gap], code[signed_gap + 1]
    split = threshold[(threshold >= lo) & (threshold <= hi)]
    ties = torch.cat([((lo + hi) / 2).view(1), split])
    bits = ties.view(torch.int32).to(torch.int64)
    y = torch.cat([_bits_to_float(bits + d) for d in (-1, 0, 1)])
    absmax = 2.0 ** -3
    g = (y * absmax).repeat(BLOCK // y.numel() + 1)[:BLOCK - 1]
    g = torch.cat([g, torch.tensor([absmax])]).repeat(3)  # three blocks, each with absmax inside
    n = g.numel()
    states = _states(n, torch.Generator().manual_seed(1), 1e-2, 1e-4, False)
    s = StepScalars.make(1e-3, 0.0, 0.0, 1e-8, 0.0, 1)
    ref, fast = _both(torch.randn(n), g, states, s)
    assert torch.equal(ref[2], torch.full_like(ref[2], absmax))  # the premise: exact absmax
    _assert_same(ref, fast)


def test_fast_step_does_no_per_element_search(monkeypatch):
    n = 3 * BLOCK
    states = _states(n, torch.Generator().manual_seed(0), 1e-3, 1e-6, False)
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    maps = (dynamic_map(True), dynamic_map(False))
    requant_table(maps[0]), requant_table(maps[1])  # built once, by the search

    def forbidden(*args, **kwargs):
        raise AssertionError("searched per element")

    monkeypatch.setattr(torch, "searchsorted", forbidden)
    monkeypatch.setattr(torch, "bucketize", forbidden)
    adamw8bit_step_cpu(torch.randn(n), torch.randn(n), *states, *maps, s)
    with pytest.raises(AssertionError, match="searched"):  # the reference does search
        adamw8bit_step_reference(torch.randn(n), torch.randn(n), *states, *maps, s)


def test_fast_step_of_a_nan_gradient_poisons_like_the_reference():
    # check_finite=False lets NaN in; the codes written must still be the reference's
    n = 2 * BLOCK + 3
    g = torch.randn(n)
    g[5] = math.nan
    states = _states(n, torch.Generator().manual_seed(2), 1e-3, 1e-6, False)
    ref, fast = _both(torch.randn(n), g, states, StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.0, 1))
    assert torch.isnan(ref[2][0]) and not torch.isnan(ref[2][1])
    _assert_same(ref, fast)


def test_optimizer_on_cpu_takes_the_fast_step(monkeypatch):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 80))  # 5120 elements: 8-bit states, 20 blocks
    calls = []
    real = quant8.adamw8bit_step_cpu
    monkeypatch.setattr(minift.optim.adamw8bit, "adamw8bit_step_cpu",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    opt = minift.AdamW8bit([w], lr=1e-2)
    ref_w = w.detach().clone().view(-1)
    ref_states = None
    maps = (dynamic_map(True), dynamic_map(False))
    for step in range(1, 4):
        w.grad = torch.randn_like(w)
        opt.step()
        if ref_states is None:
            ref_states = [torch.full((w.numel(),), int(nearest_code(torch.zeros(1), maps[0])),
                                     dtype=torch.uint8), torch.zeros(20),
                          torch.full((w.numel(),), int(nearest_code(torch.zeros(1), maps[1])),
                                     dtype=torch.uint8), torch.zeros(20)]
        s = StepScalars.make(1e-2, 0.9, 0.999, 1e-8, 0.0, step, seed=opt._step_seed(step, 0))
        adamw8bit_step_reference(ref_w, w.grad.view(-1), *ref_states, *maps, s)
    assert len(calls) == 3
    assert torch.equal(w.detach().view(-1), ref_w)
    assert torch.equal(opt.state[w]["exp_avg_codes"], ref_states[0])


@pytest.mark.parametrize("threads", [1, 3])
def test_fast_step_on_several_threads_equals_the_reference(threads):
    # with several torch threads the chunks run on Python threads: contiguous ranges, each in
    # chunks of THREAD_CHUNK, a range boundary inside a chunk of the one-thread walk
    n = 37 * BLOCK + 5
    gen = torch.Generator().manual_seed(threads)
    states = _states(n, gen, 1e-3, 1e-6, True)
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.1, 3, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quant8, "THREAD_CHUNK", 4 * BLOCK)
            p = torch.randn(n, generator=gen).to(torch.bfloat16)
            _assert_same(*_both(p, torch.randn(n, generator=gen), states, s, stochastic=True))
    finally:
        torch.set_num_threads(before)


def test_finite_flags_find_every_nan_and_inf_and_pass_huge_values():
    from minift.optim.quant8 import finite_flags

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quant8, "THREAD_CHUNK", 512)
            gs = [torch.full((5000,), 3e38), torch.randn(4099).to(torch.bfloat16)]  # a 2-norm overflows
            assert finite_flags(gs).tolist() == [True, True]
            for pos in (0, 2047, 4098):
                for bad in (math.nan, math.inf, -math.inf):
                    g = torch.randn(4099)
                    g[pos] = bad
                    assert finite_flags([torch.ones(3), g]).tolist() == [True, False]
    finally:
        torch.set_num_threads(before)
