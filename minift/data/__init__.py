"""Data: row formats, SFT examples and micro-batches, preference pairs."""
