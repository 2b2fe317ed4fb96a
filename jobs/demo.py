"""``reeltag demo``: generate a small SynthActions archive, tag it offline on the embedded Ray, show the results."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_spec
from pipeline.synth import Clip, write_clips
from pipeline.writer import read_table

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_CLIPS = [
    Clip("red", "circle", "moving left", seed=1), Clip("blue", "square", "moving right", seed=2),
    Clip("green", "triangle", "moving up", seed=3), Clip("yellow", "circle", "growing", seed=4),
    Clip("red", "square", "shrinking", seed=5), Clip("blue", "triangle", "moving down", seed=6),
]


def _prepare(root: Path) -> tuple[Path, Path]:
    """Videos (plus one broken file, to show the errors table) and the placeholder model."""
    videos = root / "videos"
    if not (videos / "labels.jsonl").exists():
        write_clips(videos, DEMO_CLIPS)
        (videos / "notes.mp4").write_text("this is not a video\n")
    model = root / "model"
    if not (model / "config.json").exists():
        from encoders._tiny import save_tiny

        vocab = (CONFIG.parent / "vocab" / "synth_actions.txt").read_text().splitlines()
        save_tiny(model, family="clip", words=tuple(line for line in vocab if not line.startswith("#")))
    return videos, model


def run_demo(directory: str) -> int:
    from .cli import format_summary
    from .run import run_pipeline

    root = Path(directory).resolve()
    videos, model = _prepare(root)
    print("note: the trained demo model is not in this checkout yet; using a tiny RANDOM CLIP built locally "
          f"({model}), so the tags below are not meaningful.")
    spec = load_spec(CONFIG, [f"input.paths=[{videos}]", f"model.pretrained={model}", f"output.dir={root / 'out'}",
                              f"tags.vocabulary={CONFIG.parent / 'vocab' / 'synth_actions.txt'}"])
    summary = run_pipeline(spec)
    print(format_summary(summary))
    truth = {Path(r["uri"]).name: r["caption"] for r in map(json.loads, open(videos / "labels.jsonl"))}
    segments = read_table(spec.output.dir, "segments").to_pylist()
    right = 0
    print(f"\n{'video':<10} {'time':<11} {'top tag':<30} {'score':>5}  truth")
    for row in sorted(segments, key=lambda r: (r["uri"], r["start_s"])):
        name, top = Path(row["uri"]).name, row["tags"][0]
        hit = top["label"] == truth.get(name)
        right += hit
        print(f"{name:<10} {row['start_s']:4.1f}-{row['end_s']:4.1f}s {top['label']:<30} {top['score']:5.2f}  "
              f"{truth.get(name, '?')} {'✓' if hit else '✗'}")
    for err in read_table(spec.output.dir, "errors").to_pylist():
        print(f"{Path(err['uri']).name:<10} error ({err['stage']}, {err['error_type']}): {err['message']}")
    print(f"\naccuracy: {right}/{len(segments)} segments tagged with their true caption")
    return 0
