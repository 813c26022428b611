"""The package's public names: lazy, complete, and not shadowed by submodules of the same name."""
import subprocess
import sys

import pytest

import minift


@pytest.mark.parametrize("name", sorted(minift._EXPORTS))
def test_every_public_name_resolves_from_its_module(name):
    value = getattr(minift, name)
    assert value is getattr(sys.modules[minift._EXPORTS[name]], name)


def test_functions_survive_importing_their_submodules_first():
    # a fresh interpreter, so the submodules are imported before the package attributes are read
    code = ("import minift.generate, minift.train, minift\n"
            "from minift.generate import generate\n"
            "from minift.train import train\n"
            "assert minift.generate is generate, minift.generate\n"
            "assert minift.train is train, minift.train\n"
            "import importlib; importlib.import_module('minift.generate')\n"
            "assert minift.generate is generate\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'lora_warp'"):
        minift.lora_warp  # noqa: B018
