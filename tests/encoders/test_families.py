"""Every model family against the transformers reference (its own processor and model), on tiny random checkpoints
saved with ``save_pretrained`` and loaded through the same ``from_pretrained`` path as a hub id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from encoders import ModelLoadError, create_encoder, preprocess
from encoders._tiny import save_tiny
from encoders.models import checkpoint_family, checkpoint_preprocess

WORDS = ("red circle", "blue square", "green triangle")
TEXTS = ["a red circle", "a blue square moving", "green"]
FAMILIES = {"siglip": "siglip", "siglip2": "siglip", "metaclip2": "metaclip2", "xclip": "xclip", "clip": "clip"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {name: save_tiny(tmp_path_factory.mktemp(name), family=name, words=WORDS) for name in (*FAMILIES, "owlv2")}


def _frames(n=3, h=48, w=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def parse_spec(data: dict):
    from pipeline.config import parse_spec

    return parse_spec(yaml.safe_dump(data))


def _reference(path):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path),
            AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("name", ["siglip", "siglip2", "metaclip2", "clip"])
def test_image_and_text_embeddings_match_the_reference(name, tiny_dirs):
    enc = create_encoder("auto", pretrained=str(tiny_dirs[name]), local_files_only=True, dtype="float32", device="cpu")
    assert enc.family == FAMILIES[name]
    model, processor, tokenizer = _reference(tiny_dirs[name])
    for h, w in ((48, 40), (36, 90)):  # portrait and wide: NaFlex keeps each aspect ratio
        frames = _frames(h=h, w=w)
        ours = enc.forward_features(preprocess(frames, enc.preprocess_cfg))
        with torch.no_grad():
            theirs = model.get_image_features(**processor(images=list(frames.numpy()), return_tensors="pt"))
        assert F.cosine_similarity(ours, theirs.pooler_output).min() >= 0.999, (name, h, w)
    text_kwargs = {"padding": True}
    if FAMILIES[name] == "siglip":  # SigLIP is trained on texts padded to its full length
        text_kwargs = {"padding": "max_length", "max_length": 16, "truncation": True}
    with torch.no_grad():
        ref_text = model.get_text_features(**tokenizer(TEXTS, return_tensors="pt", **text_kwargs)).pooler_output
    assert F.cosine_similarity(enc.encode_text(TEXTS), ref_text).min() >= 0.999


def test_siglip_confidence_is_the_models_own_sigmoid(tiny_dirs, tmp_path):
    """tags' confidence = sigmoid(scale * cos + bias): what SiglipModel's logits_per_image give, per label."""
    from encoders.video_text import create_model

    vocab = tmp_path / "labels.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    spec = parse_spec({"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")},
                       "model": {"family": "auto", "pretrained": str(tiny_dirs["siglip"]), "dtype": "float32",
                                 "device": "cpu"},
                       "sampling": {"frames": 1}, "tags": {"vocabulary": str(vocab), "prompts": ["{}"], "top_k": 3}})
    model = create_model(spec)
    frames = _frames(n=1)
    row = model.encode([frames.numpy()], [np.zeros(1)])[0]
    ref, processor, tokenizer = _reference(tiny_dirs["siglip"])
    with torch.no_grad():
        out = ref(**processor(images=list(frames.numpy()), return_tensors="pt"),
                  **tokenizer(list(WORDS), padding="max_length", max_length=16, return_tensors="pt"))
    expected = dict(zip(WORDS, torch.sigmoid(out.logits_per_image[0]).tolist()))
    assert {t["label"] for t in row["tags"]} == set(WORDS)
    for tag in row["tags"]:
        assert tag["confidence"] == pytest.approx(expected[tag["label"]], abs=1e-3)


def test_xclip_video_embedding_is_its_own_temporal_model(tiny_dirs, tmp_path):
    from encoders.video_text import create_model

    base = {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")},
            "model": {"family": "xclip", "pretrained": str(tiny_dirs["xclip"]), "dtype": "float32", "device": "cpu"},
            "sampling": {"frames": 8}, "temporal": {"pooling": "model"}}
    model = create_model(parse_spec(base), tagging=False)
    videos = [_frames(n=8, seed=1), _frames(n=8, h=64, w=96, seed=2)]
    ours = model.embed_segments(videos, [torch.arange(8.0)] * 2)[0]
    ref, processor, tokenizer = _reference(tiny_dirs["xclip"])
    with torch.no_grad():
        theirs = torch.cat([ref.get_video_features(**processor([list(v.numpy())], return_tensors="pt")).pooler_output
                            for v in videos])
        ref_text = ref.get_text_features(**tokenizer(TEXTS, padding=True, return_tensors="pt")).pooler_output
    assert F.cosine_similarity(ours, theirs).min() >= 0.999
    assert F.cosine_similarity(model.embed_texts(TEXTS), ref_text).min() >= 0.999
    with pytest.raises(ValueError, match="exactly 8 frames"):
        model.embed_segments([_frames(n=4)], [torch.arange(4.0)])


def test_family_rules_are_one_line_errors(tiny_dirs, tmp_path):
    from encoders.video_text import model_problems

    def problems(**sections):
        spec = {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")}, **sections}
        return model_problems(parse_spec(spec))

    xclip = {"family": "auto", "pretrained": str(tiny_dirs["xclip"])}
    assert problems(model=xclip, sampling={"frames": 4})[0] == (
        "sampling.frames", "xclip's checkpoint attends across exactly 8 frames per segment: set sampling.strategy: "
                           "uniform (or tsn) and sampling.frames: 8")
    assert problems(model=xclip, tower={"levels": [1, 2], "fusion": "mean"})[0][0] == "tower.levels"
    assert problems(model={"pretrained": str(tiny_dirs["siglip"]), "family": "siglip"},
                    temporal={"pooling": "model"})[0][0] == "temporal.pooling"
    assert problems(model=xclip, sampling={"frames": 8}, temporal={"pooling": "model"}) == []
    with pytest.raises(ModelLoadError, match="model.family is clip but checkpoint .* is a siglip: set model.family: "
                                             "siglip"):
        create_encoder("clip", pretrained=str(tiny_dirs["siglip"]), local_files_only=True)
    with pytest.raises(ModelLoadError, match="is a owlv2; supported families: auto, clip, align, siglip"):
        checkpoint_family("auto", str(tiny_dirs["owlv2"]))
    assert checkpoint_family("auto", str(tiny_dirs["siglip2"]))[0] == "siglip"


def test_naflex_preprocessing_reads_the_processor(tiny_dirs):
    cfg = checkpoint_preprocess(family="auto", pretrained=str(tiny_dirs["siglip2"]))
    assert cfg.naflex == (8, 16) and cfg.resolution == 32 and cfg.resample == "bilinear" and cfg.whole_frame
    siglip = checkpoint_preprocess(family="siglip", pretrained=str(tiny_dirs["siglip"]))
    assert siglip.naflex is None and siglip.squashes and siglip.resample == "bilinear"


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip2", "metaclip2", "xclip"])
def test_int8_keeps_every_familys_embeddings(name, tiny_dirs):
    """model.dtype: int8 (dynamic quantisation of the linear layers) against fp32: cosine >= 0.99."""
    fp32, int8 = (create_encoder("auto", pretrained=str(tiny_dirs[name]), dtype=dtype, device="cpu")
                  for dtype in ("float32", "int8"))
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.modules())
    pixels = preprocess(_frames(n=8), fp32.preprocess_cfg)
    assert F.cosine_similarity(fp32.forward_features(pixels), int8.forward_features(pixels)).min() >= 0.99
    assert F.cosine_similarity(fp32.encode_text(TEXTS), int8.encode_text(TEXTS)).min() >= 0.99


def test_int8_is_for_cpus_and_auto_picks_it_on_x86(tiny_dirs):
    import platform

    from encoders.models import resolve_dtype

    with pytest.raises(ModelLoadError, match="int8 is dynamic quantisation for CPUs"):
        resolve_dtype("int8", torch.device("cuda"))
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    if platform.machine() == "x86_64":
        assert resolve_dtype("auto", torch.device("cpu")) == "int8"


def test_owlv2_boxes_match_the_reference_post_processing(tiny_dirs):
    """Before suppression the detector's boxes are post_process_object_detection's on the same frame, normalised
    (IoU >= 0.99, same labels and scores); suppression keeps the best box of each overlapping group per label."""
    from transformers import AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection

    from encoders.detector import box_iou, create_detector, nms

    labels = WORDS
    detector = create_detector(str(tiny_dirs["owlv2"]), labels, threshold=0.0, nms_iou=1.0, max_boxes=10_000)
    frame = _frames(n=1, h=48, w=80)  # wide: OWLv2 pads it to a square, post-processing undoes that
    ref = Owlv2ForObjectDetection.from_pretrained(tiny_dirs["owlv2"]).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(tiny_dirs["owlv2"]), AutoTokenizer.from_pretrained(
        tiny_dirs["owlv2"])
    with torch.no_grad():
        out = ref(**tokenizer(list(labels), padding="max_length", max_length=16, return_tensors="pt"),
                  **processor(images=list(frame.numpy()), return_tensors="pt"))
    theirs = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(48, 80)])[0]
    ref_boxes = (theirs["boxes"] / torch.tensor([80, 48, 80, 48])).clamp(0, 1)  # on the frame, normalised
    on_frame = (ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])  # not only in the padding
    ours = detector.detect(frame)
    assert len(ours) == int(on_frame.sum()) >= 8  # every patch's best label (4 x 4 patches), those on the frame
    order = [i for i in theirs["scores"].argsort(descending=True).tolist() if on_frame[i]]
    for tag, i in zip(ours, order):
        assert box_iou(torch.tensor([tag["box"]]), ref_boxes[i][None])[0, 0] >= 0.99
        assert tag["label"] == labels[int(theirs["labels"][i])]
        assert tag["score"] == pytest.approx(float(theirs["scores"][i]), abs=1e-5)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 0, 1, 0]), 0.5)
    assert kept.tolist() == [0, 2, 3]  # box 1 overlaps box 0 of its label; box 2 is another label


def test_owlv2_region_tags_through_the_model(tiny_dirs, tmp_path):
    from encoders.video_text import create_model, model_problems

    vocab = tmp_path / "labels.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    base = {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")},
            "model": {"pretrained": str(tiny_dirs["clip"]), "dtype": "float32", "device": "cpu"},
            "regions": {"detector": "owlv2", "pretrained": str(tiny_dirs["owlv2"]), "threshold": 0.01,
                        "max_boxes": 5}}
    assert model_problems(parse_spec(base)) == [("regions.detector", "owlv2 finds boxes for the vocabulary's "
                                                                     "labels: set tags.vocabulary")]
    model = create_model(parse_spec({**base, "tags": {"vocabulary": str(vocab)}}))
    rows = model.encode([_frames(n=8, h=48, w=80).numpy()], [np.arange(8.0)])
    regions = rows[0]["region_tags"]
    assert 0 < len(regions) <= 5 and all(r["label"] in WORDS and 0 <= min(r["box"]) <= max(r["box"]) <= 1
                                         for r in regions)
    assert [r["score"] for r in regions] == sorted((r["score"] for r in regions), reverse=True)
    with pytest.raises(ModelLoadError, match="is a clip, not an owlv2 checkpoint"):
        create_model(parse_spec({**base, "tags": {"vocabulary": str(vocab)},
                                 "regions": {"detector": "owlv2", "pretrained": str(tiny_dirs["clip"])}}))
