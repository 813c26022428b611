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


class _Recorder:
    """Stands in for CUDA streams and events (as minift.tracing's stand-ins do in a trace of the
    CUDA path) and logs, in order, what the pager asks of them and the copies it makes."""

    def __init__(self, monkeypatch):
        from minift.optim import paging
        self.log, self.events = [], 0
        self.compute = self.side_stream(CPU, "compute")
        self.active = self.compute
        for name, fn in (("device_is_cuda", lambda device: True), ("side_stream", self.side_stream),
                         ("new_event", self.new_event), ("on_stream", self.on_stream),
                         ("current_stream", lambda device: self.compute),
                         ("record_stream", lambda t, s: self.log.append(("record_stream", s.name)))):
            monkeypatch.setattr(paging, name, fn)
        real_copy = torch.Tensor.copy_

        def copy(dst, src, non_blocking=False):
            self.log.append(("copy", self.active.name, non_blocking))
            return real_copy(dst, src)
        monkeypatch.setattr(torch.Tensor, "copy_", copy)

    def side_stream(self, device, name=None):
        log = self.log

        class Stream:
            def wait_stream(self, other):
                log.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                log.append(("wait_event", self.name, event.name))
        stream = Stream()
        stream.name = name or f"side{id(stream)}"
        return stream

    def new_event(self):
        log = self.log
        self.events += 1

        class Event:
            name = f"event{self.events}"

            def record(self, stream):
                log.append(("record", self.name, stream.name))

            def synchronize(self):
                log.append(("synchronize", self.name))
        return Event()

    @contextlib.contextmanager
    def on_stream(self, stream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before


def test_fetches_and_write_backs_run_on_their_own_streams_ordered_by_events(monkeypatch):
    # One stream per direction, events between them and the compute stream, and no host wait in
    # `run`; the copies themselves run on the CPU, so the values are checked too.
    rec = _Recorder(monkeypatch)
    pager, pages, host = _pager(3, budget=0)
    h2d, d2h = pager._h2d.name, pager._d2h.name
    assert len({h2d, d2h, "compute"}) == 3

    def compute(page, dev):
        dev[0].add_(1.0)
        rec.log.append(("compute", page.key))

    pager.run(pages, compute)
    first = len(rec.log)
    pager.run(pages, compute)
    log = rec.log
    assert torch.equal(host, torch.arange(3 * 64, dtype=torch.float32) + 2)  # both runs written back
    assert not [e for e in log if e[0] == "synchronize"]  # the host waits for nothing in run
    # prefetch order: fetch 0, fetch 1, compute 0, write back 0, fetch 2, ...; each on its stream
    copies = [e[1] for e in log if e[0] == "copy"]
    assert copies == [h2d, h2d, d2h, h2d, d2h, d2h] * 2
    assert all(e[2] for e in log if e[0] == "copy")  # non-blocking
    fetched = [e[1] for e in log if e[0] == "record" and e[2] == h2d]  # in fetch (= page) order
    written = [e[1] for e in log if e[0] == "record" and e[2] == d2h]
    computes = [i for i, e in enumerate(log) if e[0] == "compute"]
    for n, i in enumerate(computes):  # the compute stream waits for the page's own fetch first
        assert log[i - 1] == ("wait_event", "compute", fetched[n])
    for i, e in enumerate(log):
        if e[:2] == ("copy", d2h):  # after the update on the compute stream, buffer kept alive
            assert log[i - 2:i] == [("wait_stream", d2h, "compute"), ("record_stream", d2h)]
        if e[:2] == ("copy", h2d):  # into buffers the compute stream may have used before; in
            # run 2 also after that page's write-back of run 1 (a page's fetches in page order)
            n = sum(1 for x in log[:i] if x[:2] == ("copy", h2d))
            expect = [("wait_stream", h2d, "compute")]
            if i > first:
                expect = [("wait_stream", h2d, "compute"), ("wait_event", h2d, written[n - 3])]
            assert log[i - len(expect):i] == expect, (i, log[i - 3:i + 1])


def test_flush_orders_the_copy_out_after_the_compute_and_waits_on_the_host(monkeypatch):
    pager, pages, host = _pager(2, budget=None)
    pager.run(pages, _add_one)  # on the CPU: kept pages, newer on the "device" than on the host
    rec = _Recorder(monkeypatch)
    pager._h2d, pager._d2h = rec.side_stream(CPU, "h2d"), rec.side_stream(CPU, "d2h")
    pager.flush()
    log = rec.log
    assert log[0] == ("wait_stream", "d2h", "compute")  # the update that last wrote the kept pages
    assert [e for e in log if e[0] == "copy"] == [("copy", "d2h", True)] * 2
    # then the host waits, on an event after every write-back: its caller reads the host states
    assert log[-2][0] == "record" and log[-2][2] == "d2h" and log[-1] == ("synchronize", log[-2][1])
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
