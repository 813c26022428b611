"""Benchmarks behind `python -m minift bench [cpu|gpu]`: they write result files; nothing in the
library imports them."""
