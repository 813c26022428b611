"""Pages of optimizer state that live in (pinned) host memory and stream to the compute device.

A page is a fixed-size slice of the state tensors of one parameter (all its tensors sliced over
the same element range). The ``Pager`` owns the page table and places each page once, when it
is registered: first fit, in registration order, a page is *kept* on the device for the pager's
life while the kept pages fit within ``keep_bytes``; every later page *streams*. The placement is
fixed (nothing is evicted or promoted). ``run`` walks a list of pages: kept pages are fetched
once and then updated in place on the device; the others are copied in one page ahead of the
compute (prefetch), updated, and copied back. Copies are explicit ``Tensor.copy_`` calls, never
managed memory. The same code runs with a CPU "device" (copies are then synchronous), so the page
table, the kept set, prefetch order and write-back are tested without a GPU.

Streams and events on CUDA. Host-to-device copies (fetches) run on one side stream and
device-to-host copies (write-backs) on another, so page i's write-back and page i+2's prefetch
move at once (PCIe is full duplex); neither waits for the host, and the host waits for neither
inside ``run``:

* the compute stream waits for the event recorded after a page's fetch, before its update;
* the write-back stream waits for the compute stream before it copies an updated page out, and
  its buffers are recorded on it (``record_stream``), so the allocator reuses them only after
  the copy ran;
* the fetch stream waits for the compute stream before it copies into new buffers (they may
  reuse memory the compute stream still reads), and for the event recorded after that page's
  last write-back (a later ``run``'s fetch reads what it wrote);
* the host waits only in ``flush``, on an event after the last write-back: its callers read the
  host states next (``state_dict``, checkpoints). Nothing on the host writes a page while copies
  may be in flight: the host tensors are written only when they are made.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from minift.placement import host_side
from minift.tracing import (
    current_stream,
    device_is_cuda,
    new_event,
    on_stream,
    record_stream,
    side_stream,
    tracing,
)

# Device bytes of pages a paged optimizer keeps on the device by default: 1 GiB. Llama-3.1-8B's 8-bit AdamW
# states are 16.3 GB; keeping them all would save nothing, streaming all of them costs
# 16.3 GB of PCIe traffic each way per step. 1 GiB keeps the first ~6% of pages and bounds the
# device share; pass device_budget_bytes to trade memory for traffic.
DEFAULT_DEVICE_BUDGET = 2**30
DEFAULT_PAGE_SIZE = 2**20  # state values per page; a multiple of 256, so 8-bit blocks never straddle pages

@dataclass
class Page:
    """One page: host views of the state tensors over one element range of one parameter."""

    key: tuple  # (parameter id, page index) for traces
    host: tuple  # host tensors (views into the full state tensors)
    kept: bool = False  # kept on the device for the pager's life (placed at registration)
    device: tuple | None = None  # device copies while kept
    written: object = None  # CUDA event after the page's last write-back (None: none pending)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.host)


@dataclass
class PagerStats:
    """Transfer counters (pages and bytes, host->device and device->host) since creation."""

    h2d_pages: int = 0
    d2h_pages: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    trace: list = field(default_factory=list)  # ("fetch"|"compute"|"writeback", key), last run


class Pager:
    """Page table, the fixed first-fit placement of pages, and streaming between host and device.

    Args:
        device: where pages are computed on (``torch.device``); may be the CPU.
        keep_bytes: device bytes for kept pages; ``None`` = no limit (every page kept).
            Streaming pages use up to three more page-sized buffers beyond it.
    """

    def __init__(self, device, keep_bytes: int | None = None):
        self.device = torch.device(device)
        self.keep_bytes = keep_bytes
        self.pages: list[Page] = []
        self.kept_bytes = 0
        self.stats = PagerStats()
        # Side streams only where there is something to overlap, one per direction; decided when
        # the pager is built (a planning trace of the CUDA path, minift.tracing, takes them with
        # stand-in streams)
        cuda = device_is_cuda(self.device)
        self._h2d = side_stream(self.device) if cuda else None  # fetches
        self._d2h = side_stream(self.device) if cuda else None  # write-backs

    def add_page(self, key, host_tensors) -> Page:
        """Register a page; it is kept on the device if it still fits within ``keep_bytes``."""
        page = Page(key, tuple(host_tensors))
        fits = self.keep_bytes is None or self.kept_bytes + page.nbytes <= self.keep_bytes
        if fits:
            page.kept = True
            self.kept_bytes += page.nbytes
        self.pages.append(page)
        return page

    def run(self, pages, compute) -> None:
        """Call ``compute(page, device_tensors)`` for each page, in order, with pages on device.

        Streaming pages: page i+1 is fetched before page i is computed, and page i
        is written back right after it is computed. On CUDA nothing here waits on the host: on
        return the write-backs are queued on the write-back stream (``flush`` waits for them).
        """
        self.stats.trace = []
        pages = list(pages)
        if not pages:
            return
        pending = self._fetch(pages[0])
        for i, page in enumerate(pages):
            current = pending
            if i + 1 < len(pages):
                pending = self._fetch(pages[i + 1])  # prefetch overlaps this page's compute
            self._wait(current[1])
            self.stats.trace.append(("compute", page.key))
            compute(page, current[0])
            if not page.kept:
                self._write_back(page, current[0])

    @property
    def host_bytes(self) -> int:
        """Host memory of all pages (pinned when CUDA is present)."""
        return sum(page.nbytes for page in self.pages)

    def kept_tensors(self):
        """The device copies of kept pages (what ``keep_bytes`` holds on the device)."""
        return [t for page in self.pages if page.kept and page.device is not None
                for t in page.device]

    def flush(self) -> None:
        """Copy every kept page back to the host and wait until every write-back has landed
        (before reading or saving host state): the one place the host waits for the copies."""
        if self._d2h is not None:
            # The kept pages were last written by an update on the current stream: the copy
            # out on the write-back stream must not start before that update has finished.
            self._d2h.wait_stream(current_stream(self.device))
        for page in self.pages:
            if page.kept and page.device is not None:
                self._copy(page.host, page.device, "d2h", page.key)
        if self._d2h is not None:
            done = new_event()  # after every write-back queued so far, streamed pages' too
            done.record(self._d2h)
            done.synchronize()
            for page in self.pages:
                page.written = None

    def _fetch(self, page: Page):
        """Device tensors for ``page`` and the event that marks them ready (None on CPU)."""
        if page.kept and page.device is not None:
            return page.device, None
        dev = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in page.host)
        if self._h2d is not None:
            # The new buffers may reuse memory the current stream still reads (a freed page).
            self._h2d.wait_stream(current_stream(self.device))
            if page.written is not None:  # the host copy is this page's only once written back
                self._h2d.wait_event(page.written)
        event = self._copy(dev, page.host, "h2d", page.key)
        if page.kept:
            page.device = dev  # stays on the device from now on
        return dev, event

    def _write_back(self, page: Page, dev) -> None:
        if self._d2h is not None:
            # The write-back must not copy before the compute on the current stream is done.
            self._d2h.wait_stream(current_stream(self.device))
            for t in dev:
                record_stream(t, self._d2h)  # keep the buffer alive until the copy ran
        page.written = self._copy(page.host, dev, "d2h", page.key)

    def _copy(self, dst, src, direction: str, key):
        """Copy ``src`` into ``dst`` on the direction's stream; the event after it (None on CPU)."""
        stream = self._h2d if direction == "h2d" else self._d2h
        stream_ctx = on_stream(stream) if stream is not None else nullcontext()
        nbytes = sum(t.nbytes for t in src)
        with stream_ctx:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=stream is not None)
            event = new_event() if stream is not None else None
            if event is not None:
                event.record(stream)
        if direction == "h2d":
            self.stats.h2d_pages += 1
            self.stats.h2d_bytes += nbytes
            self.stats.trace.append(("fetch", key))
        else:
            self.stats.d2h_pages += 1
            self.stats.d2h_bytes += nbytes
            self.stats.trace.append(("writeback", key))
        return event

    def _wait(self, event) -> None:
        if event is not None:
            current_stream(self.device).wait_event(event)


def host_empty(shape, dtype) -> torch.Tensor:
    """A zero host tensor, page-locked when CUDA is present (fast, asynchronous copies).

    Created inside ``host_side()`` so that a MemoryTracker files it as host memory.
    """
    with host_side():
        return torch.zeros(shape, dtype=dtype, pin_memory=torch.cuda.is_available() and not tracing())
