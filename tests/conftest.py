"""Shared test set-up: seeds, the `gpu` marker, and Triton's interpreter on CPU-only machines."""
import os
import random

# Triton decides at decoration time (@triton.jit) whether a kernel is compiled or interpreted, so
# the switch must be set before anything imports minift.kernels. Without CUDA, kernels run in
# Triton's interpreter on CPU tensors, which is how the kernel tests exercise them here.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import settings

# CI draws the same hypothesis examples every run, so a red build is reproducible from its log;
# local runs keep drawing new ones (HYPOTHESIS_PROFILE=ci gives the CI behaviour).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "triton: runs a Triton kernel (interpreted on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="triton is not installed on this platform")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the models they train are tiny, and one thread runs them many times faster than two contended
    ones (about 15x measured on this 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_device():
    """Where kernel tests put their tensors: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")
