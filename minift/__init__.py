"""minift: fine-tune Llama-family models three ways (full, LoRA, QLoRA) on the GPU you have.

The public names below are imported on first use, so ``import minift`` stays cheap and a part
that needs an optional dependency only asks for it when it is used.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # LoRA (minift/lora.py, minift/adapter.py)
    "LoRALinear": "minift.lora",
    "lora_wrap": "minift.lora",
    "merge_lora": "minift.lora",
    "disable_adapters": "minift.lora",
    "trainable_parameters": "minift.lora",
    "trainable_summary": "minift.lora",
    "save_adapter": "minift.adapter",
    "load_adapter": "minift.adapter",
    # NF4 (minift/nf4.py, minift/nf4_linear.py)
    "NF4Weight": "minift.nf4",
    "quantize_nf4": "minift.nf4",
    "dequantize_nf4": "minift.nf4",
    "NF4Linear": "minift.nf4_linear",
    "quantize_model": "minift.nf4_linear",
    # 8-bit optimizer (minift/optim.py)
    "AdamW8bit": "minift.optim",
    "PagedAdamW8bit": "minift.optim",
    # models, checkpoints, tokenizer, data, generation
    "ModelConfig": "minift.config",
    "LlamaConfig": "minift.config",
    "PRESETS": "minift.config",
    "Llama": "minift.model",
    "load_model": "minift.loading",
    "save_model": "minift.loading",
    "load_tokenizer": "minift.tokenizer",
    "generate": "minift.generate",
    # training
    "TrainConfig": "minift.train",
    "train": "minift.train",
    # memory
    "MemoryTracker": "minift.memory",
    "estimate_memory": "minift.estimate",
    "MemoryEstimate": "minift.estimate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minift' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The ``minift`` package, whose public functions ``train`` and ``generate`` share their names
    with the submodules that define them.

    Importing a submodule (``from minift.train import TrainConfig``, anywhere) makes Python bind
    it as an attribute of the package, which would replace the public function by the module;
    here such a binding binds the function instead, so ``minift.train(...)`` and
    ``minift.generate(...)`` work whatever was imported before. The submodules stay reachable
    under their full names (``sys.modules["minift.train"]``, ``from minift.train import ...``,
    ``importlib.import_module("minift.train")``); ``import minift.train as m`` reads the package
    attribute and so gives the function.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
