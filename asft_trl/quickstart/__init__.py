"""Offline-friendly quickstart: the SmolLM2-135M-Instruct model and a small generated task to fine-tune it on."""
