"""Does the temporal head learn order? (run by hand; a few minutes on 2 cores)

    python benchmarks/temporal_order.py [--train 3000] [--held-out 120] [--epochs 40]

Generates SynthActions-style clips of six motions, three pairs of which are each other's reverse (left/right,
up/down, growing/shrinking), with varied sizes, frame rates, durations, colours, shapes and noise. Backbone: a
small random CLIP (64 px, width 64) saved and loaded through ``from_pretrained`` (no download): untrained, so
its frame embeddings carry position and size only as random features. Prints held-out top-1 for mean
pooling (which cannot tell a clip from its reverse) and for the attention head after ``reeltag train``, per
motion pair, and the training time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoders._tiny import save_tiny  # noqa: E402
from pipeline.synth import MOTIONS, sample_clips, write_clips  # noqa: E402


def reeltag(*args) -> None:
    subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--held-out", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=64, help="input size of the random CLIP backbone")
    parser.add_argument("--width", type=int, default=64, help="width of the random CLIP backbone")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "reeltag-temporal-bench"))
    args = parser.parse_args()
    root = Path(args.dir)
    started = time.monotonic()
    sizes = dict(frame_sizes=((96, 64), (80, 80), (64, 96), (112, 64)), fps=(24.0, 30.0), duration_s=(2.0, 4.0))
    train = write_clips(root / "train", sample_clips(args.train, seed=0, **sizes), caption=lambda c: c.motion)
    held = write_clips(root / "held-out", sample_clips(args.held_out, seed=1, **sizes), caption=lambda c: c.motion)
    model = save_tiny(root / f"model-{args.image_size}-{args.width}", words=MOTIONS, image_size=args.image_size,
                      width=args.width, embed_dim=args.width)
    print(f"generated {args.train} + {args.held_out} clips in {time.monotonic() - started:.0f} s")
    config = root / "train.yaml"
    config.write_text(f"input: {{paths: ['{root}/held-out']}}\nmodel: {{pretrained: '{model}', dtype: float32}}\n"
                      f"temporal: {{pooling: attention}}\noutput: {{dir: '{root}/out'}}\n"
                      f"train: {{manifest: '{train}', eval_manifest: '{held}', epochs: {args.epochs}}}\n")
    for stale in (root / "out" / "head").glob("*"):
        stale.unlink()
    reeltag("eval", config, "--set", "temporal.pooling=mean")
    mean = json.loads((root / "out" / "eval.json").read_text())
    started = time.monotonic()
    reeltag("train", config)
    seconds = time.monotonic() - started
    trained = json.loads((root / "out" / "train.json").read_text())
    print(f"held-out top-1 over six motions: mean pooling {mean['top1']:.2f} (pairs are reverses: 0.50 at best), "
          f"attention head after reeltag train {trained['eval']['top1']:.2f}")
    print(f"held-out text->video R@1 {trained['eval']['R@1']:.2f}, mAP {trained['eval']['mAP']:.2f}")
    print(f"reeltag train: {seconds:.0f} s on this machine ({args.train} clips, {args.epochs} epochs, frame "
          f"embeddings included), target < 600 s")


if __name__ == "__main__":
    main()
