"""Will it fit? `python -m minift plan`: the three methods side by side on a GPU, the memory
features that make each fit, and the TrainConfig that runs it."""
