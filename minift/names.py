"""Names minift defines once: the methods, optimizers, parallel modes, the decoder's linear layers
and the label of tokens the loss skips. Imports nothing, so every module may import it."""
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
PARALLEL = ("fsdp", "ddp")  # TrainConfig.parallel under torchrun
# the decoder's linear layers, in the order of a layer's forward
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# the label of a token the loss does not score (prompt, padding): PyTorch's cross_entropy default
# ignore_index, which Hugging Face's data collators write too
IGNORE_INDEX = -100
