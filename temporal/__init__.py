"""Temporal modelling: pooling frames into segment embeddings."""

from .pooling import AttentionPooling, build_pooler, mean_pool

__all__ = ["AttentionPooling", "build_pooler", "mean_pool"]
