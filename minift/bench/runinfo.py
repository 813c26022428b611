"""What a result file records about where it came from: the machine, the commit, uncommitted code."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

# the folder that holds minift/, kernels/ and examples/ in a source checkout (minift/bench/ is two below)
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine_info() -> dict:
    """The machine a measurement ran on, for result files.

    On CPUs the CPU model and its vector extensions matter: torch picks AVX2 or AVX-512 kernels
    at run time, their reductions sum in different orders, so losses can differ in the last
    digits between CPU types.
    """
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        pass
    flags = _cpu_flags()
    if flags:
        info["cpu_vector_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpuinfo_field(name: str):
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_model():
    return _cpuinfo_field("model name") or platform.processor() or None


def _cpu_flags() -> set:
    return set((_cpuinfo_field("flags") or "").split())


def git_commit():
    """HEAD of the checkout minift runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_modified(paths=("minift", "kernels", "examples")) -> list:
    """Tracked files under `paths` that differ from HEAD (uncommitted code a result came from)."""
    root = SOURCE_ROOT
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                             capture_output=True, text=True, cwd=root, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def portable_paths(value):
    """``value`` (a result record) with its absolute paths made machine-neutral: a path under
    the source checkout becomes relative to it, one inside an installed package's
    ``site-packages`` becomes ``<site-packages>/...``; other strings, numbers and paths as they
    are. Dicts, lists and tuples are walked."""
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v) for v in value]
    return _portable_words(value) if isinstance(value, str) else value


def _portable_words(text: str) -> str:
    """Each absolute path among the space-separated words of ``text``, made portable."""
    return " ".join(_portable_path(w) if os.path.isabs(w) else w for w in text.split(" "))


def _portable_path(path: str) -> str:
    path = os.path.normpath(path)
    marker = os.sep + "site-packages" + os.sep  # first: a virtual environment may sit in the checkout
    if marker in path:
        return "<site-packages>/" + path.split(marker, 1)[1].replace(os.sep, "/")
    root = os.path.normpath(SOURCE_ROOT)
    if path == root:
        return "."
    if path.startswith(root + os.sep):
        return os.path.relpath(path, root)
    return path
