"""Preparing data: corpus reading, tokenizer, preprocessing into indexed datasets, masking, the training datasets.
Imports nothing from ``model``, ``pipeline.training`` or ``pipeline.evaluation``."""
