"""Counting the host-device synchronisations a piece of code would make on a GPU, on a CPU.

On CUDA the host waits for the device when it reads a device value (`.item()`, `bool(t)`,
`int(t)`, `float(t)`), copies a tensor to the host (`.cpu()`, `.tolist()`, `.numpy()`,
`.to("cpu")`), or runs an operator whose output size depends on values (`nonzero`, boolean
indexing, `masked_select`, `unique`). On a CPU nothing waits, but the same calls still happen,
so counting them tells how many syncs the code would make on a GPU. Two modes see them: the
dispatch mode sees the operators (scalar reads reach `aten._local_scalar_dense`), the function
mode the Python-level copies to the host, which never reach an operator when the tensor is
already on the CPU.
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
