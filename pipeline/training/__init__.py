"""Distributed pre-training: configuration, the DeepSpeed engine builder, the trainer, checkpoints, re-sharding,
FLOPs. Imports ``pipeline.data`` and ``model``, nothing from ``pipeline.evaluation``."""
