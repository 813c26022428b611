"""Evaluation: text metrics on held-out replies, the forgetting check (general-text perplexity), and the
long-context checks (passkey retrieval, perplexity by context length) with their PNG charts."""
