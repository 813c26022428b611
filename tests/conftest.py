"""Shared test set-up: seeds, the `gpu` marker, Triton's interpreter on CPU-only machines, and a tiny
saved model for the command-line bench tests."""
import os
import random
import shutil

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory, with the example tokenizer (vocabulary
    512): what ``bench infer`` and ``bench quality`` load. Read-only for its users."""
    from minift.models.config import ModelConfig
    from minift.models.llama import Llama
    from minift.models.loading import save_model

    path = tmp_path_factory.mktemp("tiny") / "base"
    torch.manual_seed(0)
    save_model(Llama(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)), path)
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(examples, name), path / name)
    return path
