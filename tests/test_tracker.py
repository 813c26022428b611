"""MemoryTracker on hand-made modules whose memory can be computed by hand."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minift.memory.tracker import CATEGORIES, MemoryReport, MemoryTracker, format_bytes


def _stack(bias=False):
    return nn.Sequential(nn.Linear(64, 128, bias=bias), nn.ReLU(), nn.Linear(128, 32, bias=bias))


def _step(model, opt, x):
    loss = model(x).square().sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_linear_stack_breakdown_by_hand():
    model, x = _stack(), torch.randn(16, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = MemoryTracker(model, opt)
    with tracker.track():
        _step(model, opt, x)
    r = tracker.report().as_dict()
    weights = 4 * (64 * 128 + 128 * 32)
    assert r["trainable_params"] == weights and r["frozen_weights"] == 0
    assert r["gradients"] == weights
    # two fp32 moments per value plus one float32 `step` per tensor
    assert r["optimizer_states"] == 2 * weights + 2 * 4
    # saved for backward: x (first matmul), relu's output (relu and second matmul share it),
    # the output (square)
    assert r["activations"] == 4 * (16 * 64 + 16 * 128 + 16 * 32)
    assert r["device"] == "cpu"
    # steady state: states live through forward; the peak holds at least the whole step's
    # weights + states + one of (activations, gradients)
    assert r["peak"] >= weights + r["optimizer_states"] + max(r["activations"], r["gradients"])
    assert r["peak"] <= sum(r[c] for c in CATEGORIES) + r["other"]


def test_frozen_weights_and_buffers_and_no_optimizer():
    model = _stack()
    model[0].weight.requires_grad_(False)
    model.register_buffer("codes", torch.zeros(1000, dtype=torch.uint8))
    tracker = MemoryTracker(model)
    with tracker.track():
        model(torch.randn(8, 64)).sum().backward()
    rep = tracker.report()
    assert rep.frozen_weights == 4 * 64 * 128 + 1000
    assert rep.trainable_params == rep.gradients == 4 * 128 * 32
    assert rep.optimizer_states == 0
    # the first layer is frozen and its input needs no grad: only relu's output is kept
    assert rep.activations == 4 * 8 * 128
    assert any("no optimizer" in n for n in rep.notes)


def test_same_storage_saved_twice_counts_once():
    w = nn.Parameter(torch.ones(10))

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            y = x * self.w  # saves x (w's grad) and w (a parameter: not an activation)
            return (y * y).sum()  # saves y twice: one storage

    model, x = Square(), torch.randn(1000, 10)
    tracker = MemoryTracker(model)
    with tracker.track():
        model(x).backward()
    assert tracker.report().activations == 4 * 1000 * 10 * 2  # x and y, once each


def test_gradient_checkpointing_recompute_is_activation_memory():
    torch.manual_seed(0)
    blocks = nn.ModuleList(_stack() for _ in range(3))
    for b in blocks:
        b[2] = nn.Linear(128, 64, bias=False)

    class Net(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.blocks, self.ckpt = blocks, ckpt

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
            return x.sum()

    x = torch.randn(32, 64, requires_grad=False)
    measured = {}
    for ckpt in (False, True):
        tracker = MemoryTracker(Net(ckpt))
        with tracker.track():
            Net(ckpt)(x).backward()
        measured[ckpt] = tracker.report().activations
    per_block = 4 * 32 * (64 + 128)  # each block keeps its input and relu's output
    assert measured[False] == 3 * per_block
    # checkpointing keeps the block inputs and recomputes one block in backward
    assert 3 * 4 * 32 * 64 <= measured[True] < measured[False]
    assert measured[True] >= 3 * 4 * 32 * 64 + 4 * 32 * 128


def test_optimizer_states_of_8bit_adamw():
    from minift.optim.adamw8bit import AdamW8bit

    model = nn.Sequential(nn.Linear(128, 64, bias=True))  # 8192 values (8-bit) + 64 (fp32)
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    tracker = MemoryTracker(model, opt)
    with tracker.track():
        _step(model, opt, torch.randn(4, 128))
    assert tracker.report().optimizer_states == 2 * 8192 + 2 * 4 * 32 + 8 * 64


def test_report_before_track_and_bad_arguments():
    with pytest.raises(RuntimeError, match="no step was tracked"):
        MemoryTracker(_stack()).report()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MemoryTracker("model")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MemoryTracker(_stack(), optimizer=[1, 2])


def test_table_and_format():
    rep = MemoryReport(frozen_weights=3 * 2**30, activations=1536, peak=3 * 2**30 + 1536)
    table = rep.table()
    for c in CATEGORIES:
        assert f"| {c} |" in table
    assert "| frozen_weights | 3.00 GiB |" in table and "| activations | 1.50 KiB |" in table
    assert "| peak |" in table
    assert format_bytes(512) == "512 B" and format_bytes(5 * 2**20) == "5.00 MiB"


def test_cuda_report_uses_peak_reserved(monkeypatch):
    # No GPU here: feed the CUDA branch of the report fake allocator statistics. `reserved` must
    # be the high-water mark (max_memory_reserved), not what is cached at the end of the step.
    model, x = _stack(), torch.randn(16, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = MemoryTracker(model, opt)
    with tracker.track():
        _step(model, opt, x)
    cpu = tracker.report()
    assert cpu.reserved is None and "reserved" not in cpu.as_dict()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 10 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 24 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * 2**20)
    rep = tracker._build_report(cuda=True)
    assert rep.peak == 10 * 2**20 and rep.reserved == 24 * 2**20
    assert rep.as_dict()["reserved"] == 24 * 2**20
    assert "peak reserved by the CUDA allocator: 24.00 MiB" in rep.table()
    # everything but peak, other and reserved is the tracker's own accounting, as on CPU
    for c in ("frozen_weights", "trainable_params", "gradients", "optimizer_states", "activations"):
        assert getattr(rep, c) == getattr(cpu, c)


class _ReusingIds:
    """id() for storages that hands a dead object's number to the next new one, as CPython's
    allocator often does, so that collisions happen every time instead of by chance."""

    def __init__(self):
        import builtins

        self.real_id, self.slots, self.free, self.next = builtins.id, {}, [], 0
        self.reused = 0

    def __call__(self, obj):
        import heapq
        import weakref

        key = self.real_id(obj)
        if obj is None or not isinstance(obj, torch.UntypedStorage):
            return key
        if key not in self.slots:
            if self.free:
                self.slots[key] = heapq.heappop(self.free)
                self.reused += 1
            else:
                self.slots[key], self.next = self.next, self.next + 1
            weakref.finalize(obj, self._release, key)
        return self.slots[key]

    def _release(self, key):
        import heapq

        heapq.heappush(self.free, self.slots.pop(key))


def test_breakdown_does_not_depend_on_reused_ids(monkeypatch):
    # A temporary alive at the peak dies; the optimizer's first step then creates its states,
    # which may get the dead temporary's id. The breakdown must not mistake one for the other.
    def measure():
        torch.manual_seed(0)
        model = _stack()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = MemoryTracker(model, opt)
        with tracker.track():
            _step(model, opt, torch.randn(256, 64))
        return tracker.report().as_dict()

    expected = measure()
    import minift.memory.tracker

    ids = _ReusingIds()
    monkeypatch.setattr(minift.memory.tracker, "id", ids, raising=False)
    got = measure()
    assert ids.reused > 0  # numbers of dead storages were handed out again
    assert got == expected
