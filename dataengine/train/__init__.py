"""LLaVA-style training on Ray Train: model assembly, data and label masking, the training loop, checkpoints."""
