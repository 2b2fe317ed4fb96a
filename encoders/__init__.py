"""Encoders: image-text models over ``transformers`` checkpoints, the hierarchical tower, the text side."""

from ._registry import create_encoder, list_encoders, register_encoder
from .models import AlignEncoder, ClipEncoder, ImageTextEncoder, ModelLoadError
from .preprocess import PreprocessCfg, preprocess
from .text import Vocabulary, VocabularyError, label_embeddings, load_vocabulary, tag_probabilities, top_tags
from .tower import HierarchicalTower

__all__ = [
    "AlignEncoder", "ClipEncoder", "HierarchicalTower", "ImageTextEncoder", "ModelLoadError", "PreprocessCfg",
    "Vocabulary", "VocabularyError", "create_encoder", "label_embeddings", "list_encoders", "load_vocabulary",
    "preprocess", "register_encoder", "tag_probabilities", "top_tags",
]
