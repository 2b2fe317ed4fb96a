"""CLIP and ALIGN image-text encoders over Hugging Face ``transformers`` checkpoints.

Both expose one interface: ``forward_features(pixels) -> [N, D]`` image embeddings in the joint space,
``encode_text(texts) -> [L, D]``, ``logit_scale`` and the checkpoint's ``preprocess_cfg``. Checkpoints load
with ``from_pretrained`` (hub id or local directory), never with ``trust_remote_code``.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from torch import nn

from ._registry import register_encoder
from ._tiny import build_tiny_align, build_tiny_clip
from .preprocess import PreprocessCfg, normalise


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says what to set."""


class ImageTextEncoder(nn.Module):
    """Shared plumbing of the wrappers: device, dtype, tokenisation; subclasses say how to read features."""

    family = ""

    def __init__(self, model: nn.Module, tokenizer, processor: dict, *, name: str):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor  # the checkpoint's preprocessor_config.json values
        self.preprocess_cfg = PreprocessCfg.from_processor_dict(processor)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @torch.inference_mode()
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[N,3,R,R]`` -> image embeddings ``[N,D]`` (float32, not L2-normalised)."""
        return self.embed_images(pixels)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Strings -> text embeddings ``[L,D]`` (float32, not L2-normalised)."""
        return self.embed_texts(texts)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N,3,R,R]`` float pixels in 0..255 (resized and cropped) -> the backbone's normalised input."""
        return normalise(pixels, self.preprocess_cfg)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features` with gradients (training the model)."""
        return self._image(pixels.to(self.device, self.dtype)).float()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """:meth:`encode_text` with gradients (training the model)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self._text(tokens).float()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Weights (safetensors), config, tokenizer and preprocessing values: a directory ``from_pretrained``
        loads like any hub checkpoint."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(self.processor, f, indent=2)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text(self, tokens) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        raise NotImplementedError


class ClipEncoder(ImageTextEncoder):
    family = "clip"

    def _image(self, pixels):
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _text(self, tokens):
        return self.model.get_text_features(input_ids=tokens["input_ids"],
                                            attention_mask=tokens["attention_mask"]).pooler_output

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class AlignEncoder(ImageTextEncoder):
    family = "align"

    def _image(self, pixels):
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _text(self, tokens):
        return self.model.get_text_features(**tokens).pooler_output

    @property
    def logit_scale(self) -> float:
        return float(1.0 / self.model.temperature.detach())


def _load_error(family: str, pretrained: str, e: Exception) -> ModelLoadError:
    where = "directory" if os.path.isdir(os.path.expanduser(pretrained)) else "hub id"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"cannot load the {family} checkpoint {pretrained!r} ({where}): {first}. Set "
                          "model.pretrained to a local directory saved with save_pretrained, or make the hub "
                          "reachable (model.local_files_only: false)")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs and on CPUs with native bf16 matmul (AVX512_BF16 or AMX), else fp32."""
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _create_hf(cls: type[ImageTextEncoder], model_cls, *, pretrained: str, local_files_only: bool = False,
               dtype: str = "auto", device: str = "auto", scratch: bool = False) -> ImageTextEncoder:
    """``scratch``: the checkpoint's architecture, tokenizer and preprocessing, with freshly initialised weights
    (its directory needs no weights file): how a model is trained from nothing."""
    from transformers import AutoTokenizer
    from transformers.image_processing_utils import ImageProcessingMixin
    from transformers.utils import logging

    logging.disable_progress_bar()
    source = os.path.expanduser(pretrained)
    try:
        if scratch:
            model = model_cls(model_cls.config_class.from_pretrained(source, local_files_only=local_files_only))
        else:
            model = model_cls.from_pretrained(source, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(cls.family, pretrained, e) from None
    target = resolve_device(device)
    model = model.to(device=target, dtype=resolve_dtype(dtype, target))
    return cls(model, tokenizer, processor, name=pretrained)


@register_encoder
def clip(*, pretrained: str = "openai/clip-vit-base-patch32", **kwargs) -> ClipEncoder:
    """Any Hugging Face CLIP checkpoint."""
    from transformers import CLIPModel

    return _create_hf(ClipEncoder, CLIPModel, pretrained=pretrained, **kwargs)


@register_encoder
def align(*, pretrained: str = "kakaobrain/align-base", **kwargs) -> AlignEncoder:
    """Any Hugging Face ALIGN checkpoint."""
    from transformers import AlignModel

    return _create_hf(AlignEncoder, AlignModel, pretrained=pretrained, **kwargs)


@register_encoder
def tiny_clip(*, seed: int = 0, words: tuple[str, ...] = ()) -> ClipEncoder:
    """A random CLIP with a 4-layer-wide config and its own vocabulary; builds in milliseconds (tests)."""
    model, tokenizer, processor = build_tiny_clip(seed=seed, words=words)
    return ClipEncoder(model, tokenizer, processor.to_dict(), name="tiny_clip")


@register_encoder
def tiny_align(*, seed: int = 0, words: tuple[str, ...] = ()) -> AlignEncoder:
    """A random ALIGN (EfficientNet + BERT) small enough for tests."""
    model, tokenizer, processor = build_tiny_align(seed=seed, words=words)
    return AlignEncoder(model, tokenizer, processor.to_dict(), name="tiny_align")


def checkpoint_preprocess(*, family: str, pretrained: str, local_files_only: bool = False) -> PreprocessCfg:
    """Read a checkpoint's config and preprocessing values without loading weights (fails fast on the driver)."""
    from transformers import AlignConfig, CLIPConfig
    from transformers.image_processing_utils import ImageProcessingMixin

    config_cls = {"clip": CLIPConfig, "align": AlignConfig}[family]
    source = os.path.expanduser(pretrained)
    try:
        config_cls.from_pretrained(source, local_files_only=local_files_only)
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(family, pretrained, e) from None
    return PreprocessCfg.from_processor_dict(processor)
