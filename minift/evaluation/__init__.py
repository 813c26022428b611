"""Evaluation: text metrics on held-out replies and the forgetting check (general-text perplexity)."""
