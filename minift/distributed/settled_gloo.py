"""A gloo process group for measuring memory: every collective's buffers are freed where the step
frees them.

gloo runs each collective on a worker thread that holds the collective's tensors until it drops
the finished work. On a busy machine that thread can be descheduled past the moment the step drops
its own references, and the storage is then freed later, on that thread: a tracked peak moved by
up to 7% in 1 run of 6 (seen as frees on a foreign thread). :func:`init_settled_gloo` therefore
runs one worker thread per group and, after every wait, issues one more one-element all-reduce on
each group: it completes only once the worker has finished with the previous work. That is what a
trace on a fake process group assumes. Only for processes that measure; training uses plain gloo.
"""
from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist

BACKEND = "minift_settled_gloo"
_patched = False


def _serial_gloo(options, backend_options=None):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = options.timeout
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    opts._threads = 1
    return dist.ProcessGroupGloo(options.store, options.group_rank, options.group_size, opts)


def _settle_collectives() -> None:
    """Make every ``Work.wait`` in this process also wait until gloo's worker released the work."""
    global _patched
    if _patched:
        return
    from torch.utils._python_dispatch import _disable_current_modes

    dist.Backend.register_backend(BACKEND, _serial_gloo, extended_api=True, devices=["cpu"])
    work_class, inside = torch._C._distributed_c10d.Work, threading.local()
    wait, one = work_class.wait, torch.zeros(1)

    def settled_wait(work, *args, **kwargs):
        result = wait(work, *args, **kwargs)
        if not getattr(inside, "yes", False):
            inside.yes = True
            try:
                with _disable_current_modes():  # not part of the measured step
                    for group in list(dist.distributed_c10d._world.pg_map):
                        wait(group.allreduce([one]))
            finally:
                inside.yes = False
        return result

    work_class.wait = settled_wait
    _patched = True


def init_settled_gloo(rank: int, world_size: int, timeout_s: float = 600.0) -> None:
    """Join a CPU process group (MASTER_ADDR/MASTER_PORT from the environment) whose collectives
    release their buffers before the step goes on."""
    _settle_collectives()
    dist.init_process_group(BACKEND, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
