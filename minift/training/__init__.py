"""Training: TrainConfig, the loop, schedules, checkpoints and resume, the run folder."""
