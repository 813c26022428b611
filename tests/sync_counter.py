"""Counting the host-device synchronisations a piece of code would make on a GPU, on a CPU.

On CUDA the host waits for the device when it reads a device value (`.item()`, `bool(t)`,
`int(t)`, `float(t)`), copies a tensor to the host (`.cpu()`, `.tolist()`, `.numpy()`,
`.to("cpu")`), or runs an operator whose output size depends on values (`nonzero`, boolean
indexing, `masked_select`, `unique`). On a CPU nothing waits, but the same calls still happen,
so counting them tells how many syncs the code would make on a GPU. Two modes see them: the
dispatch mode sees the operators (scalar reads reach `aten._local_scalar_dense`), the function
mode the Python-level copies to the host, which never reach an operator when the tensor is
already on the CPU.

On a CPU every tensor is a host tensor, so `SyncCounter` also counts reads that are free on a
GPU run (a host batch's token count, torch AdamW's host step counters). `StepSyncs` counts the
training step's syncs in a planning trace of the CUDA path instead, where device tensors are fake
and host tensors real (tests/test_step_syncs.py).
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_SIZED = {"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                "aten::unique_consecutive"}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


class _Ops(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name == "aten::_local_scalar_dense" or name in _VALUE_SIZED or bool_index:
            self.log.append(name)
        return func(*args, **(kwargs or {}))


class _Calls(TorchFunctionMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TO_HOST or (func is torch.Tensor.to and _targets_host(args, kwargs)):
            self.log.append(func.__name__)
        return func(*args, **kwargs)


def _targets_host(args, kwargs) -> bool:
    # Only the spelled-out "cpu" string counts: generic code moves tensors to a device object
    # it was given (`norm.to(first_device)` in torch's clipping, the loop's `.to(device)`),
    # which is the host here only because the test runs on a CPU.
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, str) and torch.device(target).type == "cpu"


class SyncCounter:
    """`with SyncCounter() as syncs: ...`; then `syncs.log` names each sync, `len(syncs)` counts."""

    def __init__(self):
        self.log = []

    def __enter__(self):
        self._modes = [_Calls(self.log), _Ops(self.log)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def __len__(self):
        return len(self.log)


class StepSyncs:
    """The syncs a step would make on a GPU, counted in a planning trace of the CUDA path.

    `with StepSyncs() as syncs: minift.planning.trace.trace_step(..., device="cuda")` runs the
    real step (`minift.training.loop.run_step`, as `minift.train` runs it) on fake tensors, with
    every branch that asks `minift.tracing.on_cuda` taking the CUDA side: paging's streams,
    pinned activation offload, Flex attention. There fake tensors are device tensors and real
    ones host tensors, as on a GPU (the micro-batch is made fake where `to_device` moves it,
    which the trace itself leaves real). Only what happens inside `run_step` is logged (model
    building and quantization before it are set-up), and ``steps`` counts its calls:

    * a read of a device value can only go through `minift.tracing.known` or `known_all`
      (reading a fake tensor directly raises and fails the trace, unless the fake mode keeps
      its value as a constant: a tensor made from Python numbers and not computed on since):
      every `known` whose value is fake is counted, and every `known_all` once per device of
      its fake tensors;
    * a copy of a fake tensor to the host (`.cpu()`, `.tolist()`, `.numpy()`, `.to("cpu")`) is
      counted, as are `torch.tensor(data, device=d)` and `host_tensor.to(d)` without
      ``non_blocking`` with ``d`` a device object (on a GPU a blocking host-to-device copy, which
      waits for the stream; torch's optimizers spell out ``device="cpu"`` for their host step
      counters);
    * a ``synchronize`` of a stream or event stand-in (`minift.tracing.side_stream`,
      `new_event`): the host waiting for a side stream.

    Reads of host tensors (the micro-batch before it is moved, counts made from it, torch
    AdamW's step counters) are not syncs and are not counted. ``log`` holds one
    ``"module.function"`` per sync, in order.
    """

    def __init__(self):
        self.log = []
        self.steps = 0  # run_step calls seen
        self._patched = []
        self._in_step = False

    def _note(self, frame, what=""):
        if self._in_step:
            self.log.append(_caller(frame) + what)

    def _counted(self, run_step):
        def counted(*args, **kwargs):
            self.steps += 1
            self._in_step = True
            try:
                return run_step(*args, **kwargs)
            finally:
                self._in_step = False
        return counted

    def __enter__(self):
        import sys

        import minift.data.transfer
        import minift.tracing
        import minift.training.loop
        self._patch(sys.modules, "known", minift.tracing.known, self._known(minift.tracing.known))
        self._patch(sys.modules, "known_all", minift.tracing.known_all,
                    self._known_all(minift.tracing.known_all))
        self._patch(sys.modules, "to_device", minift.data.transfer.to_device,
                    _fake_on_device(minift.data.transfer.to_device))
        self._patch(sys.modules, "run_step", minift.training.loop.run_step,
                    self._counted(minift.training.loop.run_step))
        stand_in = minift.tracing._NoStream
        self._patched.append((stand_in, "synchronize", stand_in.synchronize))
        stand_in.synchronize = lambda _: self._note(sys._getframe(1), " (stream or event synchronize)")
        self._calls = _FakeCopies(self._note)
        self._calls.__enter__()
        return self

    def __exit__(self, *exc):
        self._calls.__exit__(*exc)
        for module, name, value in reversed(self._patched):
            setattr(module, name, value)

    def __len__(self):
        return len(self.log)

    def _patch(self, modules, name, original, replacement):
        for module_name, module in list(modules.items()):
            if module_name.split(".")[0] == "minift" and getattr(module, name, None) is original:
                self._patched.append((module, name, original))
                setattr(module, name, replacement)

    def _known(self, original):
        import sys

        from torch._subclasses.fake_tensor import DataDependentOutputException

        def known(value, assume):
            fake = []
            if callable(value):
                def probe():
                    try:
                        out = value()
                    except DataDependentOutputException:
                        fake.append(True)
                        raise
                    fake.append(_fake(out))
                    return out
                result = original(probe, assume)
            else:
                fake.append(_fake(value))
                result = original(value, assume)
            if any(fake):
                self._note(sys._getframe(1))
            return result
        return known


    def _known_all(self, original):
        import sys

        def known_all(values, assume):
            devices = {v.device for v in values if _fake(v)}
            for _ in devices:  # one read for the tensors of each device
                self._note(sys._getframe(1))
            return original(values, assume)
        return known_all


def _caller(frame) -> str:
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"


def _fake_on_device(to_device):
    def moved(batch, device):
        out = to_device(batch, device)
        mode = torch._guards.detect_fake_mode()
        return out if mode is None else {k: mode.from_tensor(v) for k, v in out.items()}
    return moved


def _blocking_to_device(args, kwargs) -> bool:
    # a host tensor (real, in a trace) copied to a device object without non_blocking: on a GPU
    # the copy waits for the stream to drain (torch copies and then synchronizes the stream)
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    return isinstance(target, torch.device) and not _fake(args[0]) and not non_blocking


def _fake(t) -> bool:
    """A device tensor of the trace: fake, or a DTensor (FSDP) whose local shard is fake. Asked
    with the fake mode off: under it, ``real.data`` (which `is_fake` looks at for parameters)
    is a fake tensor."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import _disable_current_modes

    from minift.tracing import is_fake
    if not isinstance(t, torch.Tensor):
        return False
    with _disable_current_modes():
        return is_fake(t) or (isinstance(t, DTensor) and is_fake(t._local_tensor))


class _FakeCopies(TorchFunctionMode):
    """Host copies of fake (device) tensors and blocking copies of host data to a device."""

    def __init__(self, note):
        super().__init__()
        self.note = note

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        kwargs = kwargs or {}
        to_host = func in _TO_HOST or (func is torch.Tensor.to and _targets_host(args, kwargs))
        if to_host and _fake(args[0]):
            self.note(sys._getframe(1), f" ({func.__name__})")
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") not in (None, "cpu"):
            self.note(sys._getframe(1), " (torch.tensor on a device)")
        elif func is torch.Tensor.to and _blocking_to_device(args, kwargs):
            self.note(sys._getframe(1), " (blocking copy to the device)")
        return func(*args, **kwargs)
