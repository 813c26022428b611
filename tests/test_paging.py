"""Page table, budget, resident set, prefetch order and write-back (minift/paging.py)."""
import copy

import pytest
import torch

from minift.optim.adamw8bit import AdamW8bit
from minift.optim.paging import Pager

CPU = torch.device("cpu")


def _pager(n_pages, budget, page_elems=64):
    host = torch.arange(n_pages * page_elems, dtype=torch.float32)
    pager = Pager(CPU, budget_bytes=budget)
    pages = [pager.add_page(("p", i), (host[i * page_elems:(i + 1) * page_elems],))
             for i in range(n_pages)]
    return pager, pages, host


def _add_one(page, dev):
    dev[0].add_(1.0)


def test_unlimited_budget_fetches_each_page_once():
    pager, pages, host = _pager(4, budget=None)
    before = host.clone()
    pager.run(pages, _add_one)
    pager.run(pages, _add_one)
    assert (pager.stats.h2d_pages, pager.stats.d2h_pages) == (4, 0)
    assert pager.resident_bytes == 4 * 64 * 4
    assert torch.equal(host, before)  # resident pages are newer on the device until flush
    pager.flush()
    assert pager.stats.d2h_pages == 4
    assert torch.equal(host, before + 2)


def test_zero_budget_streams_every_page_with_prefetch_order():
    pager, pages, host = _pager(3, budget=0)
    before = host.clone()
    pager.run(pages, _add_one)
    assert pager.stats.trace == [
        ("fetch", ("p", 0)), ("fetch", ("p", 1)), ("compute", ("p", 0)), ("writeback", ("p", 0)),
        ("fetch", ("p", 2)), ("compute", ("p", 1)), ("writeback", ("p", 1)),
        ("compute", ("p", 2)), ("writeback", ("p", 2))]
    pager.run(pages, _add_one)
    assert (pager.stats.h2d_pages, pager.stats.d2h_pages) == (6, 6)
    assert pager.stats.h2d_bytes == 6 * 64 * 4
    assert pager.resident_bytes == 0
    assert torch.equal(host, before + 2)  # written back after every run


def test_partial_budget_keeps_the_first_pages_resident():
    pager, pages, host = _pager(5, budget=2 * 64 * 4 + 10)
    assert [p.resident for p in pages] == [True, True, False, False, False]
    pager.run(pages, _add_one)
    pager.run(pages, _add_one)
    assert pager.stats.h2d_pages == 2 + 3 * 2 and pager.stats.d2h_pages == 3 * 2
    pager.flush()
    assert torch.equal(host, torch.arange(5 * 64, dtype=torch.float32) + 2)


def _train(steps, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (5000, 4 * 1024 + 300)]
    ps.append(torch.nn.Parameter(torch.randn(30, 20).to(dtype)))  # fp32 states, not paged
    opt = AdamW8bit(ps, lr=1e-2, weight_decay=0.1, page_size=1024, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("budget", [None, 0, 5000])
def test_paged_equals_unpaged_bit_for_bit(budget):
    a, oa = _train(3)
    b, ob = _train(3, paged=True, device_budget_bytes=budget)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = oa.state_dict(), ob.state_dict()
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k]
    stats = ob._pagers[CPU].stats
    n_pages = 5 + 5  # ceil(5000/1024) + ceil(4396/1024)
    if budget == 0:
        assert stats.h2d_pages == 3 * n_pages
    if budget is None:
        assert stats.h2d_pages == n_pages


def test_paged_bf16_stochastic_rounding_equals_unpaged():
    a, _ = _train(2, torch.bfloat16, stochastic_rounding=True)
    b, _ = _train(2, torch.bfloat16, stochastic_rounding=True, paged=True,
                  device_budget_bytes=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_paged_states_live_on_the_host():
    _, opt = _train(1, paged=True)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["exp_avg_codes"].device == CPU
    assert st["exp_avg_codes"].is_pinned() == torch.cuda.is_available()


def test_paged_resume_after_load_state_dict():
    ps, opt = _train(2, paged=True, device_budget_bytes=3000)
    saved = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in ps]
    g = [torch.randn(p.shape) for p in ps]
    for p, gi in zip(ps, g):
        p.grad = gi
    opt.step()
    expected = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, s in zip(ps, snapshot):
            p.copy_(s)
    opt2 = AdamW8bit(ps, lr=1e-2, weight_decay=0.1, page_size=1024, paged=True,
                     device_budget_bytes=3000)
    opt2.load_state_dict(saved)
    for p, gi in zip(ps, g):
        p.grad = gi
    opt2.step()
    assert all(torch.equal(p, e) for p, e in zip(ps, expected))
