"""Region tags from an open-vocabulary detector (``regions.detector: owlv2``): OWLv2 boxes for the vocabulary's
labels on a segment's frames, thresholded, non-maximum suppressed per label, as normalised frame boxes.

The checkpoint's own processor prepares the frames (OWLv2 pads a frame to a square and resizes it with its own
anti-aliasing: reimplementing it would only drift from the model) and its own post-processing turns the outputs
into boxes on the frame (:meth:`Owlv2ImageProcessor.post_process_object_detection`, which undoes the padding).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .models import ModelLoadError, _load_error


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[A, B]`` of xyxy boxes ``[A, 4]`` and ``[B, 4]``."""
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept, best first: greedily, a box is dropped when it overlaps a kept box of its label by more than
    ``iou``."""
    order = scores.argsort(descending=True)
    overlaps = box_iou(boxes[order], boxes[order]) > iou
    same = labels[order][:, None] == labels[order][None, :]
    kept: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= overlaps[i] & same[i]
    return order[torch.tensor(kept, dtype=torch.long)]


class Owlv2Detector(nn.Module):
    """Frames ``[F,H,W,3]`` uint8 -> ``region_tags``: ``{label, score, confidence, box}``, ``box`` normalised
    x0 y0 x1 y1 on the frame; score and confidence are OWLv2's own probability that the box shows the label."""

    def __init__(self, model: nn.Module, processor, tokenizer, labels: tuple[str, ...], *, threshold: float,
                 nms_iou: float, max_boxes: int):
        super().__init__()
        self.model, self.processor, self.labels = model.eval(), processor, labels
        self.threshold, self.nms_iou, self.max_boxes = threshold, nms_iou, max_boxes
        self.queries = tokenizer(list(labels), padding="max_length", truncation=True,
                                 max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")

    @torch.inference_mode()
    def detections(self, frames: torch.Tensor) -> list[dict]:
        """Per frame, the processor's post-processed boxes above the threshold (pixels), before suppression."""
        inputs = self.processor(images=list(frames.numpy()), return_tensors="pt")
        outputs = self.model(**self.queries, pixel_values=inputs["pixel_values"].to(self.model.dtype))
        sizes = [tuple(f.shape[:2]) for f in frames]
        return self.processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)

    def detect(self, frames: torch.Tensor) -> list[dict]:
        """A segment's frames -> its region tags: every frame's boxes, suppressed per label, the best
        ``max_boxes``."""
        if len(frames) == 0:
            return []
        height, width = frames.shape[1:3]
        found = self.detections(frames)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = (torch.cat([d["boxes"] for d in found]).float() / scale).clamp(0, 1)  # on the frame, normalised
        scores, labels = torch.cat([d["scores"] for d in found]).float(), torch.cat([d["labels"] for d in found])
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not wholly in OWLv2's square padding
        boxes, scores, labels = boxes[inside], scores[inside], labels[inside]
        if len(boxes) == 0:
            return []
        keep = nms(boxes, scores, labels, self.nms_iou)[:self.max_boxes]
        return [{"label": self.labels[int(labels[i])], "score": float(scores[i]), "confidence": float(scores[i]),
                 "box": [float(v) for v in boxes[i]]} for i in keep.tolist()]


def create_detector(pretrained: str, labels: tuple[str, ...], *, local_files_only: bool = False,
                    threshold: float = 0.3, nms_iou: float = 0.3, max_boxes: int = 10) -> Owlv2Detector:
    """An OWLv2 checkpoint (hub id or directory, ``from_pretrained``, never remote code) for ``labels``."""
    from transformers import AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection, PretrainedConfig

    source = os.path.expanduser(pretrained)
    try:
        config, _ = PretrainedConfig.get_config_dict(source, local_files_only=local_files_only)
        found = config.get("model_type") or "model without a model_type"
        if found != "owlv2":
            raise ModelLoadError(f"regions.pretrained {pretrained!r} is a {found}, not an owlv2 checkpoint")
        model = Owlv2ForObjectDetection.from_pretrained(source, local_files_only=local_files_only)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error("owlv2", pretrained, e) from None
    return Owlv2Detector(model, processor, tokenizer, labels, threshold=threshold, nms_iou=nms_iou,
                         max_boxes=max_boxes)
