"""Why the demo model learned shape slowly, and what the architecture config changes (run by hand; ~2-3 min a variant)

    python benchmarks/shape_from_text.py [--variants linear,clip,text-init,scale,both] [--epochs 4] [--clips 12000]
                                         [--lr 1e-3]

Single SynthActions frames (the first frame of each `actions`-split clip: sizes 8-45%, noise 0-25, squashed to
the 64 px input as the demo preprocessor does), the demo model's ViT trained from scratch, batch 64, AdamW at a
constant ``--lr`` (1e-3 by default; 3e-4 learns shape much faster, see the README). What differs is what the
image embedding is trained against:

- ``linear``: a linear layer over the 3 shapes (cross-entropy): how fast this ViT can learn shape at all.
- ``clip``: the demo model's own text tower, from scratch, over all 72 captions; a frame cannot show its motion,
  so the loss maximises the total probability of the 6 captions that match its colour and shape.
- ``text-init``: ``clip`` with ``text_config.initializer_factor: 5`` (token embeddings and projections drawn 5x
  wider, so captions that differ in one word start far apart: cosine 0.48 instead of 0.87 for shape-only pairs).
- ``scale``: ``clip`` with ``logit_scale_init_value: ln 50`` (a sharper softmax from the first step).
- ``both``: ``text-init`` and ``scale``: what ``configs/models/synthactions/config.json`` uses.

Prints held-out shape accuracy (600 frames of fresh clips) after each epoch. With a from-scratch text tower the
three shape words start out nearly interchangeable and the image side gets almost no signal to tell shapes
apart: a saddle that colour and motion (big, linear pixel differences) escape at once, and shape does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoders import create_encoder  # noqa: E402
from encoders.preprocess import normalise  # noqa: E402
from pipeline.synth import COLOURS, MOTIONS, SHAPES, SPLITS, render, sample_clips  # noqa: E402

ARCH = Path(__file__).resolve().parent.parent / "configs" / "models" / "synthactions"
CAPTIONS = [f"a {c} {s} {m}" for c in COLOURS for s in SHAPES for m in MOTIONS]


def _frames(n: int, seed: int, side: int) -> tuple[torch.Tensor, list]:
    clips = sample_clips(n, seed=seed, **SPLITS["actions"])
    first = [torch.from_numpy(render(replace(c, duration_s=0.1))[0]).permute(2, 0, 1)[None].float() for c in clips]
    x = torch.cat([F.interpolate(f, size=(side, side), mode="bilinear", antialias=True) for f in first])
    return x.round().clamp(0, 255), clips


def _encoder(variant: str):
    """The demo architecture with the variant's text init and temperature (the defaults of CLIP otherwise)."""
    directory = Path(tempfile.mkdtemp())
    shutil.copytree(ARCH, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["initializer_factor"] = 5.0 if variant in ("text-init", "both") else 1.0
    config["logit_scale_init_value"] = 3.912 if variant in ("scale", "both") else 2.6592
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    return create_encoder("clip", pretrained=str(directory), local_files_only=True, dtype="float32", device="cpu",
                          scratch=True)


def run(variant: str, train, held_out, epochs: int, lr: float) -> None:
    (x, clips), (vx, vclips) = train, held_out
    encoder = _encoder(variant)
    cfg = encoder.preprocess_cfg
    linear = torch.nn.Linear(encoder.embed_dim, len(SHAPES))
    params = list(encoder.model.parameters()) + (list(linear.parameters()) if variant == "linear" else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    shape_of = torch.tensor([SHAPES.index(c.shape) for c in clips])
    # captions that a frame matches: same colour and shape, any motion
    static = [" ".join(c.split()[:3]) for c in CAPTIONS]
    right = torch.tensor([[static[j] == f"a {c.colour} {c.shape}" for j in range(len(CAPTIONS))] for c in clips])
    started = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for first in range(0, len(x), 64):
            b = order[first:first + 64]
            image = encoder.embed_images(normalise(x[b], cfg))
            if variant == "linear":
                loss = F.cross_entropy(linear(image), shape_of[b])
            else:
                text = F.normalize(encoder.embed_texts(CAPTIONS), dim=-1)
                logits = encoder.model.logit_scale.exp() * F.normalize(image, dim=-1) @ text.T
                loss = -logits.log_softmax(-1).masked_fill(~right[b], -1e9).logsumexp(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            image = encoder.embed_images(normalise(vx, cfg))
            if variant == "linear":
                predicted = linear(image).argmax(1)
            else:
                scores = F.normalize(image, dim=-1) @ F.normalize(encoder.embed_texts(CAPTIONS), dim=-1).T
                predicted = torch.tensor([SHAPES.index(CAPTIONS[i].split()[2]) for i in scores.argmax(1).tolist()])
        accuracy = (predicted == torch.tensor([SHAPES.index(c.shape) for c in vclips])).float().mean().item()
        print(f"{variant:10s} epoch {epoch + 1}: held-out shape {accuracy:.3f}  "
              f"({(epoch + 1) * -(-len(x) // 64)} steps, {time.monotonic() - started:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="linear,clip,text-init,scale,both")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--clips", type=int, default=12000)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(2)
    side = json.loads((ARCH / "config.json").read_text())["vision_config"]["image_size"]
    train, held_out = _frames(args.clips, 1, side), _frames(600, 2, side)
    for variant in args.variants.split(","):
        run(variant, train, held_out, args.epochs, args.lr)


if __name__ == "__main__":
    main()
