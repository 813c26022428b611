"""``python -m minift export MODEL_DIR --to gguf --quant q4_k_m -o FILE [--adapter DIR]``."""
from __future__ import annotations

import os

from minift.deploy.gguf_export import QUANTS, check_quant, export_gguf, load_for_export
from minift.files import WriteError
from minift.lora.adapter import load_adapter
from minift.lora.layer import merge_lora
from minift.models.tokenizer import load_tokenizer


def add_export_arguments(parser) -> None:
    parser.add_argument("model", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("--to", default="gguf", choices=("gguf",), help="output format")
    parser.add_argument("--quant", default="q4_k_m", help=f"weight type mix: {', '.join(QUANTS)}")
    parser.add_argument("-o", "--out", required=True, help="the file to write")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter folder, merged into the base before export")


def run_export(args, parser) -> int:
    """Load (and merge), export, print one summary line; bad input is one line and exit code 2."""
    try:
        check_quant(args.quant)
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"model folder {args.model} does not exist")
        model = load_for_export(args.model)
        if args.adapter is not None:
            merge_lora(load_adapter(model, args.adapter))  # NF4 bases are dequantized by the merge
        info = export_gguf(model, args.out, args.quant, tokenizer=load_tokenizer(args.model),
                           name=os.path.basename(os.path.normpath(args.model)))
    except (ValueError, FileNotFoundError, TypeError, WriteError) as err:
        parser.error(str(err))
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["types"].items()))
    print(f"wrote {info['path']}: {info['bytes']:,} bytes, {info['parameters']:,} weights at "
          f"{info['bits_per_weight']:.2f} bits per weight ({types} tensors)")
    return 0
