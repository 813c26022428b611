"""Objectives: what a training step minimises (the token loss of SFT, DPO) and the chunked
lm_head + loss they share."""
