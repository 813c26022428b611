"""Deployment: a fine-tuned model out of minift, as a file other runtimes load (GGUF for llama.cpp
and Ollama), and `python -m minift export`."""
