"""NF4: the 4-bit weight format (bitsandbytes layout), quantize and dequantize (Triton kernel, fast
CPU path, torch reference), the 4-bit linear layer, and its FSDP2 form."""
