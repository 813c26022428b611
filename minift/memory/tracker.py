"""Where the memory of one training step goes: a measured breakdown by category.

`MemoryTracker` watches one step (forward, backward, optimizer step) and files every byte under
one of six categories (the same keys as `minift.estimate_memory`):

* ``frozen_weights``: parameters without grad plus module buffers (NF4 packed weights, absmax
  codes, double-quant statistics and code books).
* ``trainable_params``: parameters with ``requires_grad``.
* ``gradients``: the ``.grad`` tensors, at their high-water mark during the step.
* ``optimizer_states``: the tensors in ``optimizer.state`` (fp32 moments, 8-bit codes, absmax).
* ``activations``: tensors autograd keeps for backward (seen through
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, parameters and buffers
  excluded), plus what gradient checkpointing's recompute keeps: the tensors it created that are
  still alive when the recomputed forward returns (or stops early); high-water mark. What the
  recompute creates and frees on the way (e.g. a dequantized NF4 weight) is ``other``.
* ``other``: what else is alive at the peak: logits, the loss's fp32 copy, temporaries.

Host memory is reported apart, as ``host`` (its own high-water mark, not part of the peak):
tensors created inside ``host_side()`` (offloaded activations, see ``minift.models.offload``) and the
host pages of a paged optimizer. On CUDA they live in pinned host memory anyway; on a CPU run
this keeps them out of the device categories, so the "device" peak falls as it would on a GPU.

How it measures. A `TorchDispatchMode` sees every tensor an operator creates during the step and
holds a weak reference to its storage, so the tracker knows at each operator which bytes are
alive, on CPU exactly as on CUDA. The peak is the largest live total; on CUDA the reported peak
is the allocator's ``max_memory_allocated`` instead (it includes rounding and anything allocated
outside the tracker), and ``other`` is that peak minus the categories at the accounted peak.

Steady state. Optimizer states are created by the first ``step()``; from the second step on they
are alive during forward and backward too. The peak is reported for that steady state: states
that appear during the tracked step are added to the moments before the step.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# CATEGORIES and breakdown_table are read from here by callers as well
from minift.memory.report import CATEGORIES, PAGED_KEYS, MemoryReport, breakdown_table  # noqa: F401
from minift.optim.sharded import local
from minift.placement import on_host_side
from minift.sizes import format_bytes


def _storage(t):
    """The tensor's untyped storage, or None for tensors without one (meta, sparse, ...). A
    sharded (DTensor) tensor, an FSDP2 parameter or its gradient, is this rank's local shard."""
    t = local(t)
    try:
        if t.device.type == "meta":
            return None
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _on(t, st) -> torch.device:
    """Where the storage ``st`` of ``t`` lives: a fake tensor's (a planning trace's) storage is a
    meta one, its device the tensor's."""
    return st.device if st.device.type != "meta" else local(t).device


class _Saved:
    """What autograd keeps in place of a saved tensor while the tracker listens."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class _Watch(TorchDispatchMode):
    """Reports every tensor an operator returns to the tracker."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        host = on_host_side()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                (self.tracker._created_host if host else self.tracker._created)(t)
        self.tracker._op = func
        self.tracker._check_peak()
        return out


class MemoryTracker:
    """Measures where the memory of one training step goes, by category.

    Use ``with tracker.track(): <forward, backward, optimizer step>`` and then ``report()``.

    Args:
        model: the model being trained (its parameters and buffers are the weights).
        optimizer: the optimizer whose ``state`` holds the optimizer states; None to leave
            optimizer states out.
        frozen: other modules alive through the step whose parameters and buffers count as
            frozen weights (a DPO reference copy); storages shared with ``model`` count once.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 frozen: tuple = (), record_events: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"MemoryTracker: model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MemoryTracker: optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.frozen = tuple(frozen)
        # with record_events: every device allocation and free of the step, in order, for the
        # caching allocator's simulation (minift.memory.allocator); see `events()`
        self.record_events = bool(record_events)
        for i, m in enumerate(self.frozen):
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"MemoryTracker: frozen[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        self._report = None

    # ---- bookkeeping used while tracking --------------------------------------------------
    def _reset(self):
        first = next(iter(list(self.model.parameters()) + list(self.model.buffers())), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._static = {}  # id(storage) -> storage: weights, pre-existing grads and states
        self._weights = {"frozen_weights": 0, "trainable_params": 0}
        for p in self.model.parameters():
            self._add_static(p, "trainable_params" if p.requires_grad else "frozen_weights")
        for b in self.model.buffers():
            self._add_static(b, "frozen_weights")
        for m in self.frozen:
            for t in list(m.parameters()) + list(m.buffers()):
                self._add_static(t, "frozen_weights")
        self._grad_pre = sum(self._add_static(p.grad, None) for p in self.model.parameters()
                             if p.grad is not None)
        self._host_live = {}  # id(storage) -> nbytes of host tensors seen during the step
        # running sums of _live, of the saved storages made before the step, and of _host_live:
        # the peak is checked after every operator, and summing the dicts there made a tracked
        # step of a 30-layer model O(operators x live tensors), 4-5x an untracked one
        self._live_sum = self._old_saved_sum = self._host_sum = 0
        self._host_refs = {}
        self._host_static = 0  # paged optimizer states in host pages, before the step
        self._opt_start = self._optimizer_bytes(register=True)
        self.host_max = self._host_static
        self._live = {}  # id(storage) -> nbytes of storages created during the step
        # id() values are reused once an object dies, so anything compared after the moment
        # it was recorded (the peak's snapshot, gradients) goes by a serial number per storage
        self._serial_of = {}  # id(storage) -> serial of the live storage with that id
        self._serial = 0
        self._refs = {}  # id(storage) -> weakref keeping the finalizer alive
        self._saved = {}  # id(storage) -> [count, nbytes, new?]
        # Checkpointing's recompute: what it creates is "pending" until the recomputed forward
        # returns; what is still alive then is what it keeps for backward (activations), what
        # died before is scratch (e.g. a dequantized weight), counted under other.
        self._pending = {}  # id(storage) -> serial, created during the running recompute
        self._kept = set()  # ids of recomputed storages that outlived their recompute
        self._kept_serials = set()
        self._grads = {}  # id -> serial of .grad storages created during the step
        self.act_live = self.act_max = 0
        self.grad_max = self._grad_pre
        self._recomputing = 0
        self._phase = "pre"  # "pre" until the optimizer's step starts, then "post"
        self._op, self._module = None, None  # the operator and module running now (the peak's moment)
        self._names = {id(m): n or "model" for n, m in self.model.named_modules()}
        self._events = [] if self.record_events else None
        self._event_key = {}  # id(storage) -> its allocator key after a resize
        self._best = {"pre": (-1, None), "post": (-1, None)}

    def _add_static(self, t, category) -> int:
        st = _storage(t)
        if st is None or id(st) in self._static:
            return 0
        self._static[id(st)] = st
        if _on(t, st) != self.device:
            return 0
        if category is not None:
            self._weights[category] += st.nbytes()
        return st.nbytes()

    def _optimizer_tensors(self, host=False):
        """Optimizer state tensors on the device side (``host=False``) or in host pages.

        A paged optimizer (``paged`` attribute) keeps its 8-bit states in host pages; the
        copies of pages it keeps resident on the device (``kept_tensors()``) are device
        optimizer states.
        """
        if self.optimizer is None:
            return []
        paged = getattr(self.optimizer, "paged", False)
        tensors = []
        for state in self.optimizer.state.values():
            items = state.items() if isinstance(state, dict) else [("", state)]
            tensors += [v for k, v in items if isinstance(v, torch.Tensor)
                        and (paged and k in PAGED_KEYS) == host]
        if paged and not host and hasattr(self.optimizer, "kept_tensors"):
            tensors += list(self.optimizer.kept_tensors())
        return tensors

    def _optimizer_bytes(self, register=False) -> int:
        """Device-resident bytes of optimizer state, once per storage (host pages apart)."""
        seen, total = set(), 0
        for t in self._optimizer_tensors():
            st = _storage(t)
            if st is None or id(st) in seen:
                continue
            seen.add(id(st))
            if register:
                self._static[id(st)] = st
            if _on(t, st) == self.device:
                total += st.nbytes()
        if register:
            for t in self._optimizer_tensors(host=True):
                st = _storage(t)
                if st is not None and id(st) not in seen:
                    seen.add(id(st))
                    self._static[id(st)] = st
                    self._host_static += st.nbytes()
        return total

    def _created_host(self, t):
        st = _storage(t)
        if st is None or id(st) in self._host_live or id(st) in self._static:
            return
        key = id(st)
        self._host_live[key] = st.nbytes()
        self._host_sum += self._host_live[key]
        self._host_refs[key] = weakref.ref(st, lambda _, k=key: self._host_freed(k))
        self.host_max = max(self.host_max, self._host_static + self._host_sum)

    def _host_freed(self, key):
        self._host_sum -= self._host_live.pop(key, 0)
        self._host_refs.pop(key, None)

    def _created(self, t):
        st = _storage(t)
        if st is None or _on(t, st) != self.device:
            return
        key = id(st)
        if key in self._static or key in self._live or key in self._host_live:
            return
        self._live[key] = st.nbytes()
        self._live_sum += self._live[key]
        self._serial += 1
        self._serial_of[key] = self._serial
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._freed(k))
        if self._events is not None:
            self._events.append(("alloc", self._serial, self._live[key]))
        if self._recomputing:
            self._pending[key] = self._serial

    def _freed(self, key):
        nbytes = self._live.pop(key, 0)
        self._live_sum -= nbytes
        serial = self._serial_of.pop(key, None)
        if self._events is not None and serial is not None:
            self._events.append(("free", self._event_key.pop(key, serial)))
        self._refs.pop(key, None)
        self._pending.pop(key, None)
        if key in self._kept:
            self._kept.discard(key)
            self.act_live -= nbytes

    def _pack(self, t):
        st = _storage(t)
        if st is not None and _on(t, st) == self.device and id(st) not in self._static \
                and id(st) not in self._pending and id(st) not in self._kept:
            key = id(st)
            entry = self._saved.get(key)
            if entry is None:
                entry = self._saved[key] = [0, st.nbytes(), key in self._live]
                if not entry[2]:
                    self._old_saved_sum += entry[1]
                self.act_live += entry[1]
                self.act_max = max(self.act_max, self.act_live)
            entry[0] += 1
            holder = _Saved(t)
            weakref.finalize(holder, self._unsaved, key)
            self._check_peak()
            return holder
        return _Saved(t)

    def _resized(self, storage, before: int, after: int) -> None:
        key, delta = id(storage), after - before
        if delta == 0 or key not in self._live:
            return
        self._live[key] += delta
        self._live_sum += delta
        if self._events is not None:  # the allocator sees the block freed and a new one made
            serial = self._serial_of[key]
            old = self._event_key.get(key, serial)
            new = self._event_key[key] = ("resized", serial, len(self._events))
            self._events += [("free", old), ("alloc", new, self._live[key])]
        entry = self._saved.get(key)
        if entry is not None:  # saved for backward: its bytes follow the storage
            entry[1] += delta
            self.act_live += delta
            if not entry[2]:
                self._old_saved_sum += delta
        if key in self._kept:
            self.act_live += delta
        self.act_max = max(self.act_max, self.act_live)
        self._check_peak()

    def _unsaved(self, key):
        entry = self._saved.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._saved[key]
            if not entry[2]:
                self._old_saved_sum -= entry[1]
            self.act_live -= entry[1]

    def _grad_ready(self, p):
        if p.grad is None:  # already consumed and freed by an optimizer step inside backward
            return
        st = _storage(p.grad)
        if st is not None and _on(p.grad, st) == self.device and id(st) in self._serial_of:
            self._grads[id(st)] = self._serial_of[id(st)]
        self.grad_max = max(self.grad_max, self._grads_live())

    def _grads_live(self) -> int:
        return self._grad_pre + sum(self._live[k] for k, serial in self._grads.items()
                                    if self._serial_of.get(k) == serial)

    def _check_peak(self):
        old = self._old_saved_sum  # saved, made before the step
        value = self._live_sum + old
        best = self._best[self._phase]
        if value > best[0]:
            self._best[self._phase] = (value, self._snapshot(old))

    def _moment(self) -> str:
        """Where the step is: phase, the module running (or last run), the operator."""
        op = f"{self._op}" if self._op is not None else "-"
        if self._phase == "post":
            return f"optimizer step, {op}"
        if torch._C._current_graph_task_id() == -1:
            return f"forward in {self._module}, {op}" if self._module else f"forward, {op}"
        if self._recomputing:
            return f"backward, recomputing {self._module}, {op}"
        return f"backward, {op}" + (f" (last forward: {self._module})" if self._module else "")

    def _snapshot(self, old_saved):
        return {"moment": self._moment(), "live": {self._serial_of[k]: n for k, n in self._live.items()},
                "activations": self.act_live, "gradients": self._grads_live(),
                "pending": dict(self._pending),
                "old_saved": old_saved}

    # ---- hooks ------------------------------------------------------------------------
    def _install(self, stack):
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor))
        # FSDP2 frees a gathered layer by resizing its storage to 0 bytes and gathers it again by
        # resizing it back: storage calls that no dispatch mode sees, so they are watched here
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, nbytes):
            before = storage.nbytes()
            out = original(storage, nbytes)
            tracker._resized(storage, before, storage.nbytes())
            return out
        torch.UntypedStorage.resize_ = resize_
        stack.callback(setattr, torch.UntypedStorage, "resize_", original)
        handles = []
        for p in self.model.parameters():
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(self._enter_forward))
            handles.append(m.register_forward_hook(self._leave_forward, always_call=True))
        if self.optimizer is not None:
            handles.append(self.optimizer.register_step_pre_hook(self._step_starts))
        stack.callback(lambda: [h.remove() for h in handles])

    def _enter_forward(self, module, args):
        self._module = self._names.get(id(module), self._module)
        # A forward that runs inside backward is gradient checkpointing recomputing a layer:
        # what it creates and still holds when it returns is activation memory.
        if torch._C._current_graph_task_id() != -1:
            self._recomputing += 1

    def _leave_forward(self, module, args, output):
        if torch._C._current_graph_task_id() != -1 and self._recomputing:
            self._recomputing -= 1
            if not self._recomputing:
                self._recompute_done()

    def _recompute_done(self):
        # Nothing saved before the recompute is freed while it runs, so activations are at
        # their highest for this layer right now, with everything it keeps alive.
        for key, serial in self._pending.items():
            self._kept.add(key)
            self._kept_serials.add(serial)
            self.act_live += self._live.get(key, 0)
        self._pending = {}
        self.act_max = max(self.act_max, self.act_live)

    def _step_starts(self, optimizer, args, kwargs):
        if torch._C._current_graph_task_id() != -1:
            # a step inside backward (minift.optim.in_backward): the one gradient it consumes is
            # counted before the step frees it; forward and backward are still under way
            for p in self.model.parameters():
                if p.grad is not None:
                    self._grad_ready(p)
            return
        self._phase = "post"

    @contextlib.contextmanager
    def track(self):
        """Context manager around exactly one training step (forward, backward, step)."""
        self._reset()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.ExitStack() as stack:
            self._install(stack)
            stack.enter_context(_Watch(self))
            self._check_peak()
            yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        self._report = self._build_report(cuda)

    # ---- the report ---------------------------------------------------------------------
    def events(self) -> list:
        """The device allocations of the tracked step as the caching allocator would see them in
        the steady state (``record_events=True``): ("alloc", key, nbytes) for every weight,
        trainable tensor, gradient and optimizer state alive before the step (and the states the
        first step creates, which are alive from the second step on), then the step's own
        allocations and frees in order."""
        before, made, step = self._event_parts()
        return before + made + step

    def step_events(self) -> list:
        """The tracked step's own allocations and frees, in order (``record_events=True``): what
        `events` lists after the tensors alive before the step and the optimizer states it made,
        to follow another step's events in one replay."""
        return self._event_parts()[2]

    def _event_parts(self) -> tuple:
        if self._events is None:
            raise RuntimeError("MemoryTracker.events(): create the tracker with record_events=True")
        before, seen = [], set()
        for st in self._static.values():
            if id(st) not in seen and st.device.type in (self.device.type, "meta"):
                seen.add(id(st))
                before.append(("alloc", ("static", id(st)), st.nbytes()))
        states = {self._serial_of[id(st)] for st in map(_storage, self._optimizer_tensors())
                  if st is not None and id(st) in self._serial_of}
        step = [e for e in self._events if e[1] not in states]
        made = [("alloc", e[1], e[2]) for e in self._events if e[0] == "alloc" and e[1] in states]
        return before, made, step

    def report(self) -> MemoryReport:
        """The breakdown of the last tracked step."""
        if self._report is None:
            raise RuntimeError("MemoryTracker.report(): no step was tracked; "
                               "run one step inside `with tracker.track():` first")
        return self._report

    def _build_report(self, cuda) -> MemoryReport:
        # optimizer states created during this step, by serial (their id may have belonged to
        # a temporary alive at the peak)
        opt_serials = {self._serial_of[id(st)] for st in map(_storage, self._optimizer_tensors())
                       if st is not None and id(st) in self._serial_of}
        opt_end = self._optimizer_bytes()
        weights = self._weights["frozen_weights"] + self._weights["trainable_params"]
        # before the first step() the states did not exist yet; from the second step they do
        extra = max(0, opt_end - self._opt_start)
        pre, post = self._best["pre"], self._best["post"]
        # states a step inside backward created before the pre-step peak are in its live bytes
        # already; `extra` counts them for the steady state, so they are taken out once
        new_pre = sum(n for serial, n in pre[1]["live"].items() if serial in opt_serials) \
            if pre[1] else 0
        peak_pre = weights + self._opt_start + extra + pre[0] - new_pre if pre[1] else -1
        peak_post = weights + self._opt_start + post[0] if post[1] else -1
        at_peak, phase_peak = (pre[1], peak_pre) if peak_pre >= peak_post else (post[1], peak_post)
        # a peak inside a recompute: what that recompute went on to keep was activation memory
        at_peak = dict(at_peak, activations=at_peak["activations"] + sum(
            at_peak["live"].get(serial, 0) for serial in at_peak["pending"].values()
            if serial in self._kept_serials))
        new_opt = sum(n for serial, n in at_peak["live"].items() if serial in opt_serials)
        accounted = weights + self._opt_start + at_peak["activations"] + at_peak["gradients"]
        accounted += extra if peak_pre >= peak_post else new_opt
        other = sum(at_peak["live"].values()) + at_peak["old_saved"] - at_peak["activations"] \
            - (at_peak["gradients"] - self._grad_pre) - new_opt
        report = MemoryReport(
            frozen_weights=self._weights["frozen_weights"],
            trainable_params=self._weights["trainable_params"],
            gradients=self.grad_max, optimizer_states=opt_end, activations=self.act_max,
            other=max(0, other), peak=phase_peak, device=str(self.device),
            host=max(self.host_max, self._host_static))
        report.moment = at_peak.get("moment")
        # host memory by what it holds: paged optimizer states; the rest is offloaded layer inputs
        seen, host_states = set(), 0
        for t in self._optimizer_tensors(host=True):
            st = _storage(t)
            if st is not None and id(st) not in seen:
                seen.add(id(st))
                host_states += st.nbytes()
        report.host_parts = {"optimizer_states": host_states,
                             "activations": max(0, report.host - host_states)}
        if cuda:
            report.peak = torch.cuda.max_memory_allocated(self.device)
            # the allocator's high-water mark since reset_peak_memory_stats in track(): what the
            # step needed reserved, not what happens to be cached when it ends
            report.reserved = torch.cuda.max_memory_reserved(self.device)
            report.other = max(0, report.peak - accounted)
            report.notes.append("peak = torch.cuda.max_memory_allocated; other = peak minus the "
                                "categories at the accounted peak")
        else:
            report.notes.append("peak = largest live total seen by the tracker's accounting")
        self._describe_optimizer(report)
        return report

    def _describe_optimizer(self, report):
        if self.optimizer is None:
            report.notes.append("no optimizer given: optimizer states not counted")
            return
        if getattr(self.optimizer, "paged", False):
            host = sum(t.nbytes for t in self._optimizer_tensors(host=True))
            report.notes.append(
                f"paged optimizer: {format_bytes(host)} of 8-bit states live in host memory "
                "pages (counted under host); optimizer_states are the pages kept resident on "
                "the device")
