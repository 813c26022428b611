"""Several processes under torchrun: FSDP2 / DDP and data sharding (parallel), what the loop does
differently (run), sharded checkpoints (checkpoint)."""
