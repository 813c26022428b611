"""The package's public names: the API of shared/design.md section 3, plain imports, functions
that are functions whatever was imported before."""
import inspect
import subprocess
import sys

import pytest

import minift
import minift.models.config

# shared/design.md section 3, in full
CONTRACT = ("lora_wrap", "LoRALinear", "trainable_parameters", "save_adapter", "load_adapter",
            "merge_lora", "quantize_nf4", "dequantize_nf4", "NF4Linear", "quantize_model",
            "AdamW8bit", "PagedAdamW8bit", "load_model", "save_model", "load_tokenizer",
            "TrainConfig", "train", "generate", "estimate_memory", "MemoryTracker")


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_names_are_exported(name):
    assert name in minift.__all__
    value = getattr(minift, name)
    assert inspect.isclass(value) or inspect.isfunction(value), (name, value)


@pytest.mark.parametrize("name", sorted(minift.__all__))
def test_every_exported_name_is_defined_in_a_minift_module(name):
    value = getattr(minift, name)
    if isinstance(value, dict):  # a table (PRESETS): the package's object is its module's
        assert value is minift.models.config.PRESETS, name
        return
    module = getattr(value, "__module__", None) or ""
    assert module.startswith("minift."), (name, module)


def test_package_is_a_plain_module():
    assert type(minift) is type(sys)  # no module-class swap
    assert "__getattr__" not in vars(minift)  # no lazy look-up


def test_functions_survive_importing_their_modules_first():
    # a fresh interpreter, so the defining modules are imported before the package attributes are read
    code = ("import minift.models.generation, minift.training.loop, minift.evaluation.forgetting, minift\n"
            "from minift.evaluation.forgetting import evaluate\n"
            "assert minift.evaluate is evaluate, minift.evaluate\n"
            "from minift.models.generation import generate\n"
            "from minift.training.loop import train\n"
            "assert minift.generate is generate, minift.generate\n"
            "assert minift.train is train, minift.train\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="lora_warp"):
        minift.lora_warp  # noqa: B018
