"""``reeltag demo``: generate a small SynthActions archive, tag it offline on the embedded Ray with the demo model
the project trained itself (``models/synthactions``), show the results, a search and the HTML report.

The SynthActions scoring here (per-attribute accuracy, text->video R@1, the left/right and up/down pair test) is
shared by the demo, ``benchmarks/demo_model.py`` and the end-to-end test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from encoders.video_text import create_model
from pipeline.config import PipelineSpec, load_spec
from pipeline.synth import Clip, write_clips
from pipeline.writer import latest_config, read_table

from .report import write_report
from .run import format_summary, run_pipeline
from .search import format_results, search

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
MODEL = ROOT / "models" / "synthactions"
VOCABULARY = ROOT / "configs" / "vocab" / "synth_actions.txt"
DEMO_CLIPS = [  # none on plain grey: backgrounds of other brightness, tints and textures (the model saw variety)
    Clip("red", "circle", "moving left", seed=1, background=70.0, texture="gradient", texture_amp=30.0),
    Clip("blue", "square", "moving right", seed=2, background=190.0, tint=(10.0, 5.0, -15.0), texture="noise",
         texture_amp=15.0),
    Clip("green", "triangle", "moving up", seed=3, background=105.0, texture="stripes", texture_scale=0.4,
         texture_amp=12.0),
    Clip("yellow", "circle", "growing", seed=4, background=50.0, tint=(0.0, 0.0, 20.0), texture="blobs",
         texture_amp=30.0),
    Clip("red", "square", "shrinking", seed=5, background=165.0, tint=(-15.0, 10.0, 20.0), antialias=True),
    Clip("blue", "triangle", "moving down", seed=6, background=140.0, tint=(20.0, 0.0, -20.0), texture="gradient",
         texture_amp=35.0, camera_noise=3.0),
    Clip("green", "circle", "moving left", width=256, height=192, size=0.15, seed=7,  # the smallest: ~10 px in view
         background=90.0, texture="noise", texture_amp=10.0),
]
QUERY = "a red circle moving left"


def caption_parts(caption: str) -> dict[str, str]:
    """``a {colour} {shape} {motion}`` -> its three attributes."""
    words = caption.split()
    return {"colour": words[1], "shape": words[2], "motion": " ".join(words[3:])}


def demo_spec(videos: str | Path, out: str | Path, *overrides: str) -> PipelineSpec:
    """configs/demo.yaml on ``videos`` into ``out``, paths made absolute (runs from any working directory)."""
    return load_spec(CONFIG, [f"input.paths=[{videos}]", f"model.pretrained={MODEL}", f"temporal.checkpoint={MODEL}",
                              f"tags.vocabulary={VOCABULARY}", f"output.dir={out}", *overrides])


def truth_of(labels: str | Path) -> dict[str, str]:
    """uri -> caption, from a SynthActions ``labels.jsonl``."""
    return {str(Path(r["uri"]).resolve()): r["caption"] for r in map(json.loads, open(labels))}


def score_run(out_dir: str | Path, truth: dict[str, str], text_emb: dict[str, np.ndarray] | None = None) -> dict:
    """:func:`score_rows` of an output directory's segments (of its latest config: a directory re-used with
    another model or config keeps the earlier run's rows too)."""
    latest = latest_config(out_dir)
    rows = read_table(out_dir, "segments", latest[0]).to_pylist() if latest else []
    return score_rows(rows, truth, text_emb)


def score_rows(rows: list[dict], truth: dict[str, str], text_emb: dict[str, np.ndarray] | None = None) -> dict:
    """Accuracy of each segment's top tag (whole caption, colour, shape, motion); with ``text_emb`` (caption ->
    normalised text embedding) also text->video R@1 (one query per caption present) and, for the paired
    motions, how often a clip is closer to its true direction than to the opposite one (chance: 0.5)."""
    rows = [r for r in rows if str(Path(r["uri"]).resolve()) in truth]
    if not rows:
        return {"segments": 0}
    true = [caption_parts(truth[str(Path(r["uri"]).resolve())]) for r in rows]
    top = [caption_parts(r["tags"][0]["label"]) for r in rows]
    result = {"segments": len(rows),
              "caption": float(np.mean([t == p for t, p in zip(true, top)]))}
    for key in ("colour", "shape", "motion"):
        result[key] = float(np.mean([t[key] == p[key] for t, p in zip(true, top)]))
    if all(r["region_tags"] for r in rows):  # tower levels >= 2: the colour of the best tile's tag
        best = [caption_parts(max(r["region_tags"], key=lambda g: g["score"])["label"]) for r in rows]
        result["tile_colour"] = float(np.mean([t["colour"] == b["colour"] for t, b in zip(true, best)]))
    if text_emb is None:
        return result
    video = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
    captions = [truth[str(Path(r["uri"]).resolve())] for r in rows]
    queries = sorted(set(captions))
    best = (np.stack([text_emb[q] for q in queries]) @ video.T).argmax(1)
    result["text_to_video_R@1"] = float(np.mean([captions[b] == q for q, b in zip(queries, best)]))
    result["queries"] = len(queries)
    for a, b in (("moving left", "moving right"), ("moving up", "moving down")):
        wins = []
        for v, t in zip(video, true):
            if t["motion"] in (a, b):
                other = b if t["motion"] == a else a
                own = f"a {t['colour']} {t['shape']} {t['motion']}"
                wins.append(float(v @ text_emb[own]) > float(v @ text_emb[f"a {t['colour']} {t['shape']} {other}"]))
        result[f"{a.split()[1]}/{b.split()[1]}"] = float(np.mean(wins)) if wins else float("nan")
    return result


def caption_embeddings(spec: PipelineSpec) -> dict[str, np.ndarray]:
    """Every vocabulary caption's text embedding, as the pipeline computes it (prompts of ``tags.prompts``)."""
    tagger = create_model(spec, video=False).tagger
    return dict(zip(tagger.vocab.labels, tagger.label_emb.numpy()))


def _prepare(root: Path) -> Path:
    """The demo archive: the clips plus one broken file, to show the errors table."""
    videos = root / "videos"
    if not (videos / "labels.jsonl").exists():
        write_clips(videos, DEMO_CLIPS)
        (videos / "notes.mp4").write_text("this is not a video\n")
    return videos


def run_demo(directory: str) -> int:
    root = Path(directory).resolve()
    videos = _prepare(root)
    spec = demo_spec(videos, root / "out")
    print(f"reeltag demo: {len(DEMO_CLIPS)} SynthActions clips and one broken file in {videos}, tagged with the "
          f"demo model {MODEL.relative_to(ROOT)} (trained by reeltag itself; see README)")
    summary = run_pipeline(spec)
    print(format_summary(summary))
    truth = truth_of(videos / "labels.jsonl")
    segments = sorted(read_table(spec.output.dir, "segments").to_pylist(), key=lambda r: (r["uri"], r["start_s"]))
    print(f"\n{'video':<10} {'time':<11} {'top tags (score)':<66} truth")
    for row in segments:
        caption = truth.get(str(Path(row["uri"]).resolve()), "?")
        tags = ", ".join(f"{t['label']} ({t['score']:.2f})" for t in row["tags"][:2])
        mark = "✓" if row["tags"][0]["label"] == caption else "✗"
        print(f"{Path(row['uri']).name:<10} {row['start_s']:4.1f}-{row['end_s']:4.1f}s {tags:<66} {caption} {mark}")
    for err in read_table(spec.output.dir, "errors").to_pylist():
        print(f"{Path(err['uri']).name:<10} error ({err['stage']}, {err['error_type']}): {err['message']}")
    scores = score_run(spec.output.dir, truth)
    right = round(scores["caption"] * scores["segments"])
    print(f"\naccuracy: {right}/{scores['segments']} segments tagged with their true caption "
          f"(colour {scores['colour']:.0%}, shape {scores['shape']:.0%}, motion {scores['motion']:.0%})")
    print(f'\nsearch "{QUERY}":')
    print(format_results(search(spec.output.dir, QUERY, top_k=3)["results"]))
    print(f"\nreport: {write_report(spec.output.dir)}")
    return 0
