"""Checkpoints: atomic step-N folders with CRC-32s, the optimizer and RNG state in them, and the
fingerprints that tell whether a checkpoint belongs to this run."""
