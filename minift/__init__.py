"""minift: fine-tune Llama-family models three ways (full, LoRA, QLoRA) on the GPU you have."""
from minift.deploy.gguf_export import export_gguf
from minift.evaluation.forgetting import evaluate
from minift.evaluation.multiple_choice import multiple_choice
from minift.lora.adapter import load_adapter, save_adapter
from minift.lora.layer import (
                         LoRALinear,
                         disable_adapters,
                         lora_wrap,
                         merge_lora,
                         trainable_parameters,
                         trainable_summary,
)
from minift.lora.soup import average_adapters
from minift.memory import MemoryEstimate, MemoryTracker
from minift.models.config import PRESETS, LlamaConfig, ModelConfig
from minift.models.context import extend_context
from minift.models.generation import generate
from minift.models.llama import Llama
from minift.models.loading import load_model, save_model
from minift.models.tokenizer import load_tokenizer
from minift.nf4.linear import NF4Linear, quantize_model
from minift.nf4.quantize import NF4Weight, dequantize_nf4, quantize_nf4
from minift.optim import AdamW8bit, PagedAdamW8bit
from minift.planning.estimate import estimate_memory
from minift.training.config import TrainConfig
from minift.training.loop import check_resume, train

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit", "Llama", "LlamaConfig", "LoRALinear", "MemoryEstimate", "MemoryTracker",
    "ModelConfig", "NF4Linear", "NF4Weight", "PRESETS", "PagedAdamW8bit", "TrainConfig",
    "average_adapters", "check_resume", "dequantize_nf4", "disable_adapters", "estimate_memory",
    "evaluate", "export_gguf", "extend_context", "generate", "load_adapter", "load_model", "load_tokenizer",
    "lora_wrap", "merge_lora", "multiple_choice", "quantize_model", "quantize_nf4", "save_adapter",
    "save_model", "train",
    "trainable_parameters", "trainable_summary",
]
