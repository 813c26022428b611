"""GGUF: the file format llama.cpp and Ollama read, and its block quantizations."""
