"""Bounded work per file, whatever its header says: files made by the ffmpeg CLI to be hostile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline._isolate import IsolatedDecoder
from pipeline.config import parse_spec
from pipeline.stages import decode_rows

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI is not installed")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _rows(path: Path, tmp_path: Path, decode: str = "") -> tuple[list[dict], dict]:
    spec = parse_spec(f"input: {{paths: ['{path}']}}\noutput: {{dir: '{tmp_path}/out'}}\n"
                      f"segments: {{window_s: 4.0}}\nsampling: {{frames: 2}}\ndecode: {{{decode}}}\n")
    *segments, end = decode_rows(str(path), spec, 32)
    return segments, end


@needs_ffmpeg
def test_three_frames_around_a_ninety_hour_gap_cost_three_frames(tmp_path):
    """A tiny MKV whose third frame is stamped 90 h in: refused by max_duration_s; with the limit raised, only the
    windows that hold a frame are segments (was: 324,000 windows and ~6 GB in the driver)."""
    path = tmp_path / "gap.mkv"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=1", "-frames:v", "3",
            "-vf", "setpts='if(eq(N,2),PTS+324000/TB,PTS)'", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    assert path.stat().st_size < 20_000
    segments, end = _rows(path, tmp_path)
    assert (end["error_type"], segments) == ("too_long", []) and "decode.max_duration_s" in end["message"]
    segments, end = _rows(path, tmp_path, "max_duration_s: 1000000")
    assert end["error_type"] == "" and [s["start_s"] for s in segments] == [0.0, 324000.0]


@needs_ffmpeg
def test_a_sliver_of_a_frame_is_refused_before_it_is_decoded_huge(tmp_path):
    path = tmp_path / "sliver.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=1024x2:rate=25", "-t", "1", "-c:v", "libx264", "-pix_fmt",
            "yuv420p", str(path))
    segments, end = _rows(path, tmp_path)
    assert (end["error_type"], segments) == ("bad_aspect", []) and "decode.max_aspect (12:1)" in end["message"]


@needs_ffmpeg
def test_frames_larger_than_max_pixels_are_refused(tmp_path):
    path = tmp_path / "big.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x480:rate=25", "-t", "1", "-c:v", "libx264", "-pix_fmt",
            "yuv420p", str(path))
    segments, end = _rows(path, tmp_path, "max_pixels: 100000")
    assert (end["error_type"], segments) == ("too_large", []) and "640x480" in end["message"]


def allocate(mb: int):
    """A row generator that needs ``mb`` MiB (run in the decoder child)."""
    try:
        block = np.ones(mb << 20, np.uint8)
        yield {"kind": "end", "got": int(block[-1])}
    except MemoryError:
        yield {"kind": "end", "error_type": "MemoryError"}


def test_the_decoder_process_has_an_address_space_limit():
    decoder = IsolatedDecoder(allocate, timeout_s=60, recycle_after=10, memory_mb=2048)
    try:
        def failed(kind, message, count):
            return {"kind": "end", "error_type": kind}

        assert list(decoder.run(4096, on_fail=failed)) == [{"kind": "end", "error_type": "MemoryError"}]
        assert list(decoder.run(64, on_fail=failed)) == [{"kind": "end", "got": 1}]  # the same child goes on
    finally:
        decoder.close()
