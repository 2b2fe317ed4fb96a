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
from pipeline.decode import choose_backend, decode_size, open_video, probe
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


@pytest.mark.parametrize("backend", ["pyav", "auto"])
@pytest.mark.parametrize("kind", ["mpegts", "hours_in", "cut_copy", "hls"])
def test_a_late_starting_stream_is_read_exactly_from_its_first_frame(late_starts, kind, backend):
    """Through PyAV, and through what ``auto`` picks for a dense read of H.264 (Decord, or PyAV where Decord
    cannot open the file or counts its frames otherwise)."""
    path = late_starts[kind]
    info, index = probe(str(path))
    assert index.times_s[0] == 0.0
    size = decode_size(info, 120)
    pts, expected = _all_frames(path, size)
    shown = np.isin(pts, index.pts)  # an edit list can hide frames that decode (before the cut)
    chosen = "pyav" if backend == "pyav" else choose_backend(info, "auto", True)
    with open_video(str(path), info, index, size, backend=chosen, requested=backend) as reader:
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


def test_a_directory_yields_every_video_whatever_its_container(tmp_path):
    """Broadcast (MXF, M2TS), camcorder (DV), phone (3GP) and legacy web (FLV) files, written by the ffmpeg CLI,
    are all found in a directory and read from their first frame; what is not a video is counted, not hidden; a
    symlink loop does not repeat a file."""
    import os
    from collections import Counter

    from pipeline.config import parse_spec
    from pipeline.validate import check_spec

    made = {"broadcast.mxf": ["-c:v", "mpeg2video", "-b:v", "2M"], "bluray.m2ts": H264,
            "camcorder.dv": ["-c:v", "dvvideo", "-s", "720x576", "-pix_fmt", "yuv420p"],
            "phone.3gp": ["-c:v", "mpeg4", "-s", "176x144"], "web.flv": ["-c:v", "flv1"]}
    root = tmp_path / "archive"
    (root / "deeper").mkdir(parents=True)
    for name, codec in made.items():
        rate = ["-r", "25"] if name.endswith(".dv") else []
        _ffmpeg(*SOURCE, "-t", "2", *rate, *codec, str(root / "deeper" / name))
    (root / "notes.txt").write_text("not a video\n")
    (root / ".DS_Store").write_bytes(b"\0\0")
    os.symlink(root, root / "deeper" / "loop")  # a loop back to the top
    spec = parse_spec(f"input: {{paths: ['{root}']}}\noutput: {{dir: '{tmp_path}/out'}}\n")
    skipped: Counter = Counter()
    videos = check_spec(spec, skipped=skipped)
    assert sorted(os.path.basename(v) for v in videos) == sorted(made)
    assert skipped == {".txt": 1, "hidden": 1}
    spec = parse_spec(f"input: {{paths: ['{root}']}}\noutput: {{dir: '{tmp_path}/out'}}\n"
                      "segments: {window_s: 1.0}\nsampling: {frames: 2}\n")
    for video in videos:
        info, index = probe(video)
        assert index.times_s[0] == 0.0 and 1.8 <= index.end_s <= 2.2, (video, index.end_s)
        *segments, end = decode_rows(video, spec, 64)
        assert end["error_type"] == "" and len(segments) == 2, (video, end["message"])


def test_decord_reads_the_wrong_frames_in_mpeg_ts(late_starts):
    """Pinned: Decord 0.6.0 opens a broadcast TS file and counts its frames right, but its frame k is not the k-th
    frame, so auto sends every MPEG-TS file to PyAV. If a Decord release fixes it, this fails: then
    DECORD_INEXACT_CONTAINERS can lose mpegts."""
    from pipeline.decode import DECORD_INEXACT_CONTAINERS, DecordReader

    path = late_starts["mpegts"]
    info, index = probe(str(path))
    assert info.container in DECORD_INEXACT_CONTAINERS and choose_backend(info, "auto", True) == "pyav"
    size = decode_size(info, 120)
    _, expected = _all_frames(path, size)
    reader = DecordReader(str(path), info, index, size)
    wanted = np.arange(0, len(index.pts), 5)
    assert not np.array_equal(reader.read(wanted), expected[wanted])
