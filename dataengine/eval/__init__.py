"""Evaluation of trained models: held-out loss and perplexity, and the synthetic-web VQA benchmark."""
