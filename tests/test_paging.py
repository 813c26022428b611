"""Page table, budget, resident set, prefetch order and write-back (minift/paging.py)."""
import contextlib
import copy

import pytest
import torch

from minift.memory.tracker import MemoryTracker
from minift.optim.adamw8bit import AdamW8bit, PagedAdamW8bit
from minift.optim.paging import DEFAULT_DEVICE_BUDGET, Pager

CPU = torch.device("cpu")


def _pager(n_pages, budget, page_elems=64):
    host = torch.arange(n_pages * page_elems, dtype=torch.float32)
    pager = Pager(CPU, keep_bytes=budget)
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
    assert pager.kept_bytes == 4 * 64 * 4
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
    assert pager.kept_bytes == 0
    assert torch.equal(host, before + 2)  # written back after every run


def test_partial_budget_keeps_the_first_pages_resident():
    pager, pages, host = _pager(5, budget=2 * 64 * 4 + 10)
    assert [p.kept for p in pages] == [True, True, False, False, False]
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


def test_default_budget_is_one_gib_and_none_is_unlimited():
    p = [torch.nn.Parameter(torch.randn(5000))]
    assert AdamW8bit(p, paged=True).device_budget_bytes == DEFAULT_DEVICE_BUDGET == 2**30
    assert PagedAdamW8bit(p).device_budget_bytes == 2**30
    assert PagedAdamW8bit(p, device_budget_bytes=None).device_budget_bytes is None


def test_host_bytes_and_resident_tensors():
    _, opt = _train(2, paged=True, device_budget_bytes=5000)
    # 8-bit states: 2 code bytes + 2 fp32 absmax per 256-element block, per element
    expected = sum(2 * n + 2 * 4 * -(-n // 256) for n in (5000, 4 * 1024 + 300))
    assert opt.host_bytes == expected
    pager = opt._pagers[CPU]
    assert pager.host_bytes == expected
    resident = opt.kept_tensors()
    assert resident and sum(t.nbytes for t in resident) == pager.kept_bytes <= 5000
    assert AdamW8bit([torch.nn.Parameter(torch.randn(5000))]).host_bytes == 0


def test_tracker_files_paged_states_under_host():
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 60)  # 6000-element weight: 8-bit states, paged
    opt = PagedAdamW8bit(model.parameters(), lr=1e-2, page_size=1024, device_budget_bytes=2100)
    x = torch.randn(4, 100)
    for _ in range(2):
        tracker = MemoryTracker(model, opt)
        with tracker.track():
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    report = tracker.report()
    assert report.host == opt.host_bytes == 2 * 6000 + 2 * 4 * 24
    resident = sum(t.nbytes for t in opt.kept_tensors())
    assert 0 < resident <= 2100
    # on the device: the resident pages plus the bias's fp32 moments (60 elements, unpaged)
    assert report.optimizer_states == resident + 2 * 60 * 4


class _FakeStream:
    def __init__(self, log):
        self.log = log

    def wait_stream(self, other):
        self.log.append(("side waits for", other))

    def synchronize(self):
        self.log.append("synchronize")


def test_flush_orders_the_copy_out_after_the_compute(monkeypatch):
    # CUDA streams are stood in for by recorders: flush must make the side stream wait for the
    # current (compute) stream before it copies any resident page out.
    log = []
    pager, pages, host = _pager(2, budget=None)
    pager.run(pages, _add_one)
    pager._side = _FakeStream(log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "compute stream")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    class _Event:
        def record(self, stream):
            log.append("event")

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    real_copy = Pager._copy

    def copy(self, dst, src, direction, key):
        log.append(("copy", direction))
        return real_copy(self, dst, src, direction, key)

    monkeypatch.setattr(Pager, "_copy", copy)
    pager.flush()
    assert log[0] == ("side waits for", "compute stream")
    assert [e for e in log if isinstance(e, tuple) and e[0] == "copy"] == [("copy", "d2h")] * 2
    assert log[-1] == "synchronize"
    assert torch.equal(host, torch.arange(128, dtype=torch.float32) + 1)


def test_the_paging_defaults_are_defined_once():
    # the 1 GiB budget and the page size live in minift.optim.paging; AdamW8bit and TrainConfig take
    # them from there, and estimate_memory takes TrainConfig's (it has no paging default of its own)
    import dataclasses
    import inspect

    from minift.optim import adamw8bit, paging
    from minift.planning import estimate, trace
    from minift.training.config import TrainConfig
    assert paging.DEFAULT_DEVICE_BUDGET == 2**30 and paging.DEFAULT_PAGE_SIZE == 2**20
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["paged_device_budget"]
    assert field.default is paging.DEFAULT_DEVICE_BUDGET  # the object itself, not a copy of its value
    params = inspect.signature(AdamW8bit).parameters
    assert params["page_size"].default is paging.DEFAULT_PAGE_SIZE
    assert params["device_budget_bytes"].default is paging.DEFAULT_DEVICE_BUDGET
    assert "paged_device_budget" not in inspect.signature(estimate.estimate_memory).parameters
    assert "paged_device_budget" in estimate.TRAIN_FIELDS
    est = estimate.estimate_memory("tiny", "lora", 1, 32, optimizer="paged_adamw8bit", device="cpu")
    assert est.settings["train_config"] == "TrainConfig(method='lora', optimizer='paged_adamw8bit')"
    traced = eval(est.settings["train_config"], {"TrainConfig": TrainConfig})  # noqa: S307
    assert traced.paged_device_budget is paging.DEFAULT_DEVICE_BUDGET
    source = "".join(inspect.getsource(m) for m in (estimate, trace, adamw8bit, TrainConfig))
    source = source.replace("# 2**30", "").replace("| 2**30 |", "")
    assert "2**30" not in source and "1073741824" not in source and "2**20" not in source
