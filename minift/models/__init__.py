"""Models: the config, the Llama module (attention, fused RMSNorm / RoPE / SwiGLU, activation
offload, the switches a step turns on), loading and saving checkpoints, the tokenizer with its chat
templates, and generation."""
