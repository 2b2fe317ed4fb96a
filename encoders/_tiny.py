"""Tiny random checkpoints of every family (CLIP, ALIGN, SigLIP, SigLIP 2, MetaCLIP 2, X-CLIP, OWLv2) with their
own small vocabularies, for tests and the offline demo.

They are real ``transformers`` models: saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path as a hub checkpoint, so nothing is fetched and nothing is special-cased.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

BASE_WORDS = ("a", "an", "the", "of", "video", "photo", "person", "man", "woman", "doing", "playing", "someone")


def _clip_bpe_files(words: tuple[str, ...], directory: Path) -> tuple[Path, Path]:
    """A CLIP byte-level BPE vocabulary: every lowercase letter, plus one merge chain per whole word."""
    letters = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(letters)}
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in (*BASE_WORDS, *words) if w.isalnum()):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if merged not in vocab:
                merges.append(f"{pieces[0]} {pieces[1]}")
                vocab[merged] = len(vocab)
            pieces = [merged, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


def _words(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(w for text in words for w in text.lower().replace(",", " ").split())


def build_tiny_clip(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32, width: int = 32,
                    layers: int = 2, embed_dim: int = 16, patch_size: int | None = None, heads: int = 2,
                    mlp_ratio: int = 2, text_layers: int | None = None, squash: bool = False) -> tuple:
    """Random CLIPModel + CLIPTokenizer + CLIPImageProcessor; ``words`` get whole-word tokens. ``squash``: the
    processor resizes whole frames to the square input (no centre crop), as the demo model does."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*map(str, _clip_bpe_files(_words(words), Path(tmp))))
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=mlp_ratio * width,
                num_hidden_layers=text_layers or layers, num_attention_heads=heads, max_position_embeddings=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=patch_size or image_size // 4, hidden_size=width,
                  intermediate_size=mlp_ratio * width, num_hidden_layers=layers, num_attention_heads=heads)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    square = {"height": image_size, "width": image_size}
    processor = CLIPImageProcessor(size=square, do_center_crop=False, crop_size=square) if squash else \
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    return model, tokenizer, processor


def build_tiny_align(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32,
                     embed_dim: int = 32) -> tuple:
    """Random AlignModel (EfficientNet + BERT) + BertTokenizer + EfficientNetImageProcessor."""
    from transformers import AlignConfig, AlignModel, BertTokenizer, EfficientNetImageProcessor

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
              *dict.fromkeys((*BASE_WORDS, *_words(words)))]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
        tokenizer = BertTokenizer(str(Path(tmp) / "vocab.txt"))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    # EfficientNet's pooled width is round_filters(1280) = 32 at width_coefficient 0.1; the text projection matches it.
    # At the default init (std 0.02) this shallow EfficientNet's activations vanish (~1e-31); 0.5 keeps them O(1).
    vision = dict(image_size=image_size, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=embed_dim,
                  num_channels=3, initializer_range=0.5)
    config = AlignConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)
    torch.manual_seed(seed)
    model = AlignModel(config).eval()
    processor = EfficientNetImageProcessor(size={"height": image_size + 4, "width": image_size + 4},
                                           crop_size={"height": image_size, "width": image_size}, do_center_crop=True,
                                           rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False,
                                           include_top=False)  # as kakaobrain/align-base
    return model, tokenizer, processor


def _sentencepiece_file(words: tuple[str, ...], directory: Path) -> Path:
    """A tiny SentencePiece model (what SigLIP's ``spiece.model`` is) trained on the words and the alphabet."""
    import sentencepiece as spm

    text = directory / "corpus.txt"
    text.write_text("\n".join([" ".join((*BASE_WORDS, *words))] * 4 + list(string.ascii_lowercase + string.digits)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "spiece"), vocab_size=96,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   eos_id=1, unk_id=2, pad_id=0, bos_id=-1, minloglevel=2)
    return directory / "spiece.model"


def _word_pieces(words: tuple[str, ...], prefix: str = "\u2581") -> list[str]:
    """Whole words (with the SentencePiece space marker) and single characters: a vocabulary for BPE/Unigram."""
    chars = [prefix, *string.ascii_lowercase, *string.digits, ",", "."]
    return list(dict.fromkeys([*chars, *(prefix + c for c in chars[1:]),
                               *(prefix + w for w in dict.fromkeys((*BASE_WORDS, *words)))]))


def _tiny_text(tokenizer, width: int, layers: int, heads: int, mlp_ratio: int, positions: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=mlp_ratio * width,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions)


def _tiny_vision(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: int) -> dict:
    return dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=mlp_ratio * width,
                num_hidden_layers=layers, num_attention_heads=heads)


def build_tiny_siglip(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32, width: int = 32,
                      layers: int = 2, heads: int = 2, mlp_ratio: int = 2, patch_size: int = 8) -> tuple:
    """Random SiglipModel + SiglipTokenizer (a trained SentencePiece file, as google/siglip-*) + processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = SiglipTokenizer(str(_sentencepiece_file(_words(words), Path(tmp))), model_max_length=16)
    text = _tiny_text(tokenizer, width, layers, heads, mlp_ratio, 16)
    config = SiglipConfig(text_config={**text, "pad_token_id": tokenizer.pad_token_id,
                                       "eos_token_id": tokenizer.eos_token_id},
                          vision_config=_tiny_vision(image_size, patch_size, width, layers, heads, mlp_ratio))
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=2)
    return model, tokenizer, processor


def build_tiny_siglip2(*, seed: int = 0, words: tuple[str, ...] = (), max_num_patches: int = 16, width: int = 32,
                       layers: int = 2, heads: int = 2, mlp_ratio: int = 2, patch_size: int = 8) -> tuple:
    """Random Siglip2Model (NaFlex: any aspect ratio, up to ``max_num_patches`` patches) + Gemma-style BPE
    tokenizer (Siglip2Tokenizer) + Siglip2ImageProcessor."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Tokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *_word_pieces(_words(words))]
    tokenizer = Siglip2Tokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=16)
    text = _tiny_text(tokenizer, width, layers, heads, mlp_ratio, 16)
    vision = {**_tiny_vision(0, patch_size, width, layers, heads, mlp_ratio), "num_patches": max_num_patches}
    vision.pop("image_size")
    config = Siglip2Config(text_config={**text, "pad_token_id": tokenizer.pad_token_id,
                                        "eos_token_id": tokenizer.eos_token_id}, vision_config=vision)
    torch.manual_seed(seed)
    model = Siglip2Model(config).eval()
    processor = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=max_num_patches)
    return model, tokenizer, processor


def build_tiny_metaclip2(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32, width: int = 32,
                         layers: int = 2, heads: int = 2, mlp_ratio: int = 2, embed_dim: int = 16) -> tuple:
    """Random MetaClip2Model + XLM-RoBERTa-style Unigram tokenizer (multilingual, as facebook/metaclip-2-*)."""
    from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model, XLMRobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", *_word_pieces(_words(words)), "<mask>"]
    tokenizer = XLMRobertaTokenizer(vocab=[(p, -1.0 - len(p) * 0.1 if i > 3 else 0.0) for i, p in enumerate(pieces)],
                                    model_max_length=16)
    text = {**_tiny_text(tokenizer, width, layers, heads, mlp_ratio, 16), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = MetaClip2Config(text_config=text, projection_dim=embed_dim,
                             vision_config=_tiny_vision(image_size, image_size // 4, width, layers, heads, mlp_ratio))
    torch.manual_seed(seed)
    model = MetaClip2Model(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def build_tiny_xclip(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32, width: int = 32,
                     layers: int = 2, heads: int = 2, mlp_ratio: int = 2, embed_dim: int = 16,
                     num_frames: int = 8) -> tuple:
    """Random XCLIPModel (cross-frame attention over ``num_frames``, its multi-frame integration transformer and
    video-conditioned prompts) + CLIPTokenizer + VideoMAEImageProcessor (as microsoft/xclip-base-patch32)."""
    from transformers import CLIPTokenizer, VideoMAEImageProcessor, XCLIPConfig, XCLIPModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*map(str, _clip_bpe_files(_words(words), Path(tmp))))
    text = {**_tiny_text(tokenizer, width, layers, heads, mlp_ratio, 32), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {**_tiny_vision(image_size, image_size // 4, width, layers, heads, mlp_ratio), "num_frames": num_frames,
              "mit_hidden_size": embed_dim, "mit_intermediate_size": 2 * embed_dim, "mit_num_hidden_layers": 1,
              "mit_num_attention_heads": 2}
    config = XCLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim, prompt_layers=1,
                         prompt_attention_heads=2, prompt_num_attention_heads=2)
    torch.manual_seed(seed)
    model = XCLIPModel(config).eval()
    processor = VideoMAEImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def build_tiny_owlv2(*, seed: int = 0, words: tuple[str, ...] = (), image_size: int = 32, width: int = 32,
                     layers: int = 2, heads: int = 2, mlp_ratio: int = 2) -> tuple:
    """Random Owlv2ForObjectDetection (a box and a class embedding per patch) + CLIPTokenizer + Owlv2ImageProcessor
    (pads to a square, then resizes: as google/owlv2-base-patch16-ensemble at 960 px)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*map(str, _clip_bpe_files(_words(words), Path(tmp))))
    text = {**_tiny_text(tokenizer, width, layers, heads, mlp_ratio, 16), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Owlv2Config(text_config=text, projection_dim=width,  # its class head needs text width = projection
                         vision_config=_tiny_vision(image_size, image_size // 4, width, layers, heads, mlp_ratio))
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():  # random box offsets of std ~1 throw every box off the image; small ones keep the
        model.box_head.dense2.weight.mul_(0.01)  # patch grid's prior boxes, as a trained model's are near them
    processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def _quiet_transformers() -> None:
    """Without torchvision, transformers warns on every image processor it builds; we preprocess in torch."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_tiny(directory: str | Path, *, family: str = "clip", seed: int = 0, words: tuple[str, ...] = (),
              weights: bool = True, **sizes) -> Path:
    """Build a tiny random checkpoint of ``family`` and ``save_pretrained`` it (weights as safetensors);
    ``sizes`` go to the builder (e.g. ``width``, ``embed_dim``, ``image_size``). ``weights=False`` writes only the
    architecture, tokenizer and preprocessing: what ``train.backbone: scratch`` starts from."""
    _quiet_transformers()
    build = TINY_BUILDERS[family]
    model, tokenizer, processor = build(seed=seed, words=words, **sizes)
    directory = Path(directory)
    (model if weights else model.config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


TINY_BUILDERS = {"clip": build_tiny_clip, "align": build_tiny_align, "siglip": build_tiny_siglip,
                 "siglip2": build_tiny_siglip2, "metaclip2": build_tiny_metaclip2, "xclip": build_tiny_xclip,
                 "owlv2": build_tiny_owlv2}
