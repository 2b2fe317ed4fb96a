"""True timelines: streams that do not start at time 0, made by the ffmpeg CLI the ways real files are made.

MPEG-TS recordings and HLS segments start at 1.4 s or hours in; a file cut with ``-ss ... -c copy`` carries an edit
list and starts mid-GOP. Each must give segments over its whole playable duration, with times in seconds from
its first frame, and exactly the frames FFmpeg itself decodes (a plain decode from the start, no seeking).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_spec
from pipeline.decode import decode_size, open_video, probe
from pipeline.stages import decode_rows

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI is not installed")

SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25"]
H264 = ["-c:v", "libx264", "-g", "25", "-bf", "2", "-pix_fmt", "yuv420p"]


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def late_starts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timelines")
    files = {"mpegts": root / "broadcast.ts", "hours_in": root / "hours.ts", "cut_copy": root / "cut.mp4",
             "hls": root / "hls" / "seg1.ts"}
    _ffmpeg(*SOURCE, "-t", "5", *H264, "-f", "mpegts", str(files["mpegts"]))  # starts at 1.4 s, as any TS
    _ffmpeg(*SOURCE, "-t", "4", *H264, "-output_ts_offset", "3600", "-f", "mpegts", str(files["hours_in"]))
    full = root / "full.mp4"
    _ffmpeg(*SOURCE, "-t", "8", *H264, str(full))
    _ffmpeg("-ss", "2.3", "-i", str(full), "-t", "4", "-c", "copy", str(files["cut_copy"]))  # edit list, mid-GOP
    files["hls"].parent.mkdir()
    _ffmpeg(*SOURCE, "-t", "6", *H264, "-f", "hls", "-hls_time", "2", "-hls_list_size", "0",
            "-hls_segment_filename", str(files["hls"].parent / "seg%d.ts"), str(files["hls"].parent / "index.m3u8"))
    return files


def _all_frames(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every frame FFmpeg decodes from the start (no seek), as RGB at ``size``, with its pts."""
    import av

    with av.open(str(path)) as container:
        frames = [(f.pts, f.to_ndarray(width=size[0], height=size[1], format="rgb24"))
                  for f in container.decode(container.streams.video[0])]
    frames.sort(key=lambda f: f[0])
    return np.array([p for p, _ in frames]), np.stack([f for _, f in frames])


@pytest.mark.parametrize("kind", ["mpegts", "hours_in", "cut_copy", "hls"])
def test_a_late_starting_stream_is_read_exactly_from_its_first_frame(late_starts, kind):
    path = late_starts[kind]
    info, index = probe(str(path))
    assert index.times_s[0] == 0.0
    size = decode_size(info, 120)
    pts, expected = _all_frames(path, size)
    shown = np.isin(pts, index.pts)  # an edit list can hide frames that decode (before the cut)
    with open_video(str(path), info, index, size, backend="pyav") as reader:
        wanted = np.arange(len(index.pts))
        np.random.default_rng(0).shuffle(wanted[1:])  # out of order: every seek, backwards and forwards
        for chunk in np.array_split(wanted, 6):
            chunk = np.sort(chunk)
            got = reader.read(chunk)
            np.testing.assert_array_equal(reader.served_pts, index.pts[chunk])
            np.testing.assert_array_equal(got, expected[shown][chunk])


@pytest.mark.parametrize("kind", ["mpegts", "hours_in", "cut_copy", "hls"])
def test_a_late_starting_stream_is_tagged_over_its_whole_duration(late_starts, kind, tmp_path):
    path = late_starts[kind]
    spec = parse_spec(f"input: {{paths: ['{path}']}}\noutput: {{dir: '{tmp_path}'}}\n"
                      "segments: {window_s: 1.0}\nsampling: {frames: 2}\n")
    rows = list(decode_rows(str(path), spec, 64))
    end = rows[-1]
    assert end["kind"] == "end" and end["error_type"] == "", end["message"]
    segments = [r for r in rows if r["kind"] == "segment"]
    _, index = probe(str(path))
    # 1 s windows over the whole playable duration (a last part shorter than min_segment_s, 1 s, is dropped)
    assert len(segments) == end["n_segments"] == int(index.end_s) >= 2
    assert segments[0]["start_s"] == 0.0 and index.end_s - segments[-1]["end_s"] < 1.0
    assert all(0 <= t < index.end_s for r in segments for t in r["frame_times_s"])
