"""Image-text encoders over Hugging Face ``transformers`` checkpoints: CLIP, ALIGN, SigLIP (and SigLIP 2, NaFlex
included), MetaCLIP 2 and X-CLIP (a video model: its frames attend to each other, in groups of its ``num_frames``).

All expose one interface: ``forward_features(pixels) -> [N, D]`` image embeddings in the joint space,
``encode_text(texts) -> [L, D]``, ``logit_scale`` and the checkpoint's ``preprocess_cfg``. Checkpoints load
with ``from_pretrained`` (hub id or local directory), never with ``trust_remote_code``.
"""

from __future__ import annotations

import functools
import json
import os
import platform

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._registry import register_encoder
from ._tiny import build_tiny_align, build_tiny_clip
from .preprocess import PreprocessCfg, normalise


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says what to set."""


class ImageTextEncoder(nn.Module):
    """Shared plumbing of the wrappers: device, dtype, tokenisation; subclasses say how to read features."""

    family = ""
    model_types: dict[str, str] = {}  # checkpoint model_type -> transformers model class name
    logit_bias: float | None = None  # SigLIP: the learned bias of its sigmoid; None: a softmax model
    frames_per_call: int = 1  # images that must go through the backbone together (X-CLIP: its num_frames)

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
        return self._text(self.tokenize(texts)).float()

    def tokenize(self, texts: list[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)

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
    model_types = {"clip": "CLIPModel"}

    def _image(self, pixels):
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _text(self, tokens):
        return self.model.get_text_features(input_ids=tokens["input_ids"],
                                            attention_mask=tokens["attention_mask"]).pooler_output

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class MetaClip2Encoder(ClipEncoder):
    """MetaCLIP 2 (multilingual, XLM-R tokenizer): CLIP's architecture and interface."""

    family = "metaclip2"
    model_types = {"metaclip_2": "MetaClip2Model"}


class AlignEncoder(ImageTextEncoder):
    family = "align"
    model_types = {"align": "AlignModel"}

    def _image(self, pixels):
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _text(self, tokens):
        return self.model.get_text_features(**tokens).pooler_output

    @property
    def logit_scale(self) -> float:
        return float(1.0 / self.model.temperature.detach())


class SiglipEncoder(ImageTextEncoder):
    """SigLIP and SigLIP 2: a sigmoid per (image, text) pair with a learned bias, texts padded to the length the
    model was trained with. SigLIP 2 NaFlex checkpoints see a frame at its own aspect ratio, as patches."""

    family = "siglip"
    model_types = {"siglip": "SiglipModel", "siglip2": "Siglip2Model"}

    def tokenize(self, texts):
        length = self.model.config.text_config.max_position_embeddings
        return self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").to(self.device)

    def _image(self, pixels):
        if self.preprocess_cfg.naflex is None:
            return self.model.get_image_features(pixel_values=pixels).pooler_output
        patches, mask, shapes = naflex_patches(pixels, *self.preprocess_cfg.naflex)
        return self.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                             spatial_shapes=shapes).pooler_output

    def _text(self, tokens):
        return self.model.get_text_features(**tokens).pooler_output

    @property
    def embed_dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float:
        return float(self.model.logit_bias.detach())


class XClipEncoder(ClipEncoder):
    """X-CLIP: CLIP's towers with cross-frame attention inside the vision tower (images go through it in groups
    of ``num_frames``: one segment each) and its own temporal model (:meth:`pool_video`, the multi-frame
    integration transformer). Frame features are the per-frame projections before that model."""

    family = "xclip"
    model_types = {"xclip": "XCLIPModel"}

    @property
    def frames_per_call(self) -> int:
        return self.model.config.vision_config.num_frames

    def _image(self, pixels):
        if len(pixels) % self.frames_per_call:
            raise ValueError(f"X-CLIP embeds frames in groups of {self.frames_per_call} (one segment each), got "
                             f"{len(pixels)} images")
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def pool_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw frame features ``[B, T, D]`` -> video embeddings ``[B, D]`` (X-CLIP's own temporal model)."""
        return self.model.mit(frames.to(self.dtype)).pooler_output.float()


def naflex_patches(pixels: torch.Tensor, patch: int, max_patches: int):
    """Normalised ``[N,3,h,w]`` (sides multiples of ``patch``) -> SigLIP 2 NaFlex inputs: patches
    ``[N, max_patches, patch*patch*3]`` padded with zeros, their mask ``[N, max_patches]``, spatial shapes
    ``[N, 2]``."""
    n, _, h, w = pixels.shape
    x = rearrange(pixels, "n c (gh p) (gw q) -> n (gh gw) (p q c)", p=patch, q=patch)
    mask = torch.zeros(n, max_patches, dtype=torch.int32, device=pixels.device)
    mask[:, :x.shape[1]] = 1
    x = F.pad(x, (0, 0, 0, max_patches - x.shape[1]))
    return x, mask, torch.tensor([[h // patch, w // patch]] * n, device=pixels.device)


FAMILIES: dict[str, type[ImageTextEncoder]] = {
    cls.family: cls for cls in (ClipEncoder, AlignEncoder, SiglipEncoder, MetaClip2Encoder, XClipEncoder)}


def _load_error(family: str, pretrained: str, e: Exception) -> ModelLoadError:
    where = "directory" if os.path.isdir(os.path.expanduser(pretrained)) else "hub id"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"cannot load the {family} checkpoint {pretrained!r} ({where}): {first}. Set "
                          "model.pretrained to a local directory saved with save_pretrained, or make the hub "
                          "reachable (model.local_files_only: false)")


INT8_PARITY = 0.99  # least cosine of an int8 model's embeddings to its fp32 ones (reference images and texts)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``float32``, ``bfloat16`` or ``int8``. ``auto``: bf16 on GPUs; on x86 CPUs int8 (dynamic quantisation of the
    linear layers: the fastest measured on every x86 CPU here, README "Model families"); elsewhere bf16 where the
    CPU has native bf16 matmul (AVX512_BF16, AMX), else fp32."""
    if dtype == "int8" and device.type != "cpu":
        raise ModelLoadError("model.dtype: int8 is dynamic quantisation for CPUs; on a GPU use bfloat16 (or auto)")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16"
    if platform.machine().lower() in ("x86_64", "amd64"):
        return "int8"
    return "bfloat16" if cpu_has_bf16() else "float32"


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose image side has every ``nn.Linear`` dynamically quantised (int8 weights per output
    channel, activations quantised per call): torch's own quantisation, no other dependency. The text side stays
    fp32: it runs once per vocabulary and query, and int8 text flipped a near-tied demo tag (1 of 79) where int8
    images alone flipped none."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    image_side = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                  if type(module) is nn.Linear and not name.startswith("text")  # not MultiheadAttention's own
                  and "embedding" not in name}  # SigLIP 2 reads its patch embedding's weight dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(copy.deepcopy(model), image_side, dtype=torch.qint8)


def _checked_int8(encoder: ImageTextEncoder) -> ImageTextEncoder:
    """``encoder`` (fp32) quantised to int8, if its image and text embeddings keep cosine >= INT8_PARITY to the fp32
    ones on fixed reference images and texts; else a one-line error naming the dtypes to use instead."""
    quantised = type(encoder)(quantize_int8(encoder.model), encoder.tokenizer, encoder.processor, name=encoder.name)
    side, k = encoder.preprocess_cfg.resolution, encoder.frames_per_call
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.rand(2, 3, 1, 1, generator=g).expand(2, 3, side, side) * 255,
                        torch.rand(2, 3, side, side, generator=g) * 255])
    pixels = encoder.normalise(images.round()).repeat_interleave(k, 0)
    texts = ["a video of a person", "a red circle moving left"]
    cos = min(float(F.cosine_similarity(encoder.forward_features(pixels), quantised.forward_features(pixels)).min()),
              float(F.cosine_similarity(encoder.encode_text(texts), quantised.encode_text(texts)).min()))
    if cos < INT8_PARITY:
        raise ModelLoadError(f"int8 changes {encoder.name!r} too much (cosine {cos:.3f} to fp32 on reference images "
                             f"and texts, below {INT8_PARITY}): set model.dtype: bfloat16 or float32")
    return quantised


@functools.cache
def cpu_has_bf16() -> bool:
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


SUPPORTED = "auto, " + ", ".join(FAMILIES)


def checkpoint_family(family: str, pretrained: str, *, local_files_only: bool = False) -> tuple[str, dict]:
    """The family of the checkpoint ``pretrained`` (``auto``: from its config's ``model_type``) and that config as a
    dict; one-line errors for a checkpoint of another or an unsupported family. Reads ``config.json`` only."""
    from transformers import PretrainedConfig

    if family != "auto" and family not in FAMILIES:
        raise ModelLoadError(f"unknown model family {family!r}; supported: {SUPPORTED}")
    try:
        config, _ = PretrainedConfig.get_config_dict(os.path.expanduser(pretrained), local_files_only=local_files_only)
        if not config:  # a directory without config.json reads as {}
            raise OSError(f"no config.json in {pretrained}")
    except (OSError, ValueError) as e:
        raise _load_error(family, pretrained, e) from None
    model_type = config.get("model_type", "")
    found = next((f for f, cls in FAMILIES.items() if model_type in cls.model_types), None)
    if found is None:
        raise ModelLoadError(f"checkpoint {pretrained!r} is a {model_type or 'model without a model_type'}; "
                             f"supported families: {SUPPORTED} (model types "
                             f"{', '.join(t for cls in FAMILIES.values() for t in cls.model_types)})")
    if family not in ("auto", found):
        raise ModelLoadError(f"model.family is {family} but checkpoint {pretrained!r} is a {model_type}: set "
                             f"model.family: {found} (or auto)")
    return found, config


def _create_hf(family: str, *, pretrained: str, local_files_only: bool = False, dtype: str = "auto",
               device: str = "auto", scratch: bool = False) -> ImageTextEncoder:
    """``scratch``: the checkpoint's architecture, tokenizer and preprocessing, with freshly initialised weights
    (its directory needs no weights file): how a model is trained from nothing."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.image_processing_utils import ImageProcessingMixin
    from transformers.utils import logging

    logging.disable_progress_bar()
    family, config = checkpoint_family(family, pretrained, local_files_only=local_files_only)
    cls = FAMILIES[family]
    model_cls = getattr(transformers, cls.model_types[config["model_type"]])
    source = os.path.expanduser(pretrained)
    try:
        if scratch:
            model = model_cls(model_cls.config_class.from_pretrained(source, local_files_only=local_files_only))
        else:
            model = model_cls.from_pretrained(source, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(family, pretrained, e) from None
    target = resolve_device(device)
    dtype = resolve_dtype(dtype, target)
    model = model.to(device=target, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    encoder = cls(model, tokenizer, processor, name=pretrained)
    return _checked_int8(encoder) if dtype == "int8" else encoder


def _family_entry(family: str, default: str, doc: str):
    def entry(*, pretrained: str = default, **kwargs) -> ImageTextEncoder:
        return _create_hf(family, pretrained=pretrained, **kwargs)

    entry.__name__, entry.__doc__ = family, doc
    return register_encoder(entry)


for _family, _default, _doc in (
        ("auto", "openai/clip-vit-base-patch32", "Any supported checkpoint; the family from its model_type."),
        ("clip", "openai/clip-vit-base-patch32", "Any Hugging Face CLIP checkpoint."),
        ("align", "kakaobrain/align-base", "Any Hugging Face ALIGN checkpoint."),
        ("siglip", "google/siglip2-base-patch16-224", "SigLIP and SigLIP 2 checkpoints (NaFlex included)."),
        ("metaclip2", "facebook/metaclip-2-worldwide-b16", "MetaCLIP 2 checkpoints (multilingual)."),
        ("xclip", "microsoft/xclip-base-patch32", "X-CLIP video checkpoints (frames in groups of num_frames).")):
    _family_entry(_family, _default, _doc)


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
    from transformers.image_processing_utils import ImageProcessingMixin

    checkpoint_family(family, pretrained, local_files_only=local_files_only)
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(os.path.expanduser(pretrained),
                                                                     local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(family, pretrained, e) from None
    return PreprocessCfg.from_processor_dict(processor)
