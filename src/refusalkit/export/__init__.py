"""Exports of an edited model: transformers folders, GGUF files and llama.cpp control vectors, each with
a model card (README.md), optionally pushed to the Hugging Face Hub. See docs/export.md."""
