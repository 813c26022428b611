"""LoRA: the adapter layer and model surgery, PEFT-format adapter files, merging with a logit
check, and adapter soups."""
