"""Decoding real encoded files: both backends, bad inputs, and a Decord defect pinned down."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.config import parse_spec
from pipeline.decode import DecodeError, DecordReader, PyAVReader, decode_size, probe
from pipeline.stages import DecodeStage
from pipeline.synth import Clip, render, write_video


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    frames = render(Clip("red", "circle", "moving right", width=128, height=96, duration_s=3.0))
    path = write_video(tmp_path_factory.mktemp("h264") / "clip.mp4", frames, fps=25,
                       options={"crf": "10", "g": "30", "bf": "2", "preset": "veryfast"})
    return path, frames


def test_probe_reads_stream_facts(h264):
    info = probe(str(h264[0]))
    assert (info.width, info.height, info.codec, info.frames) == (128, 96, "h264", 75)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("reader_cls", [DecordReader, PyAVReader])
def test_backends_return_the_requested_frames(h264, reader_cls):
    path, truth = h264
    reader = reader_cls(str(path), (128, 96))
    times, end = reader.frame_times()
    assert len(times) == 75 and times[:3] == pytest.approx([0, 0.04, 0.08]) and end == pytest.approx(3.0)
    index = np.array([0, 7, 31, 32, 60, 74])
    frames = reader.read(index)
    assert frames.shape == (6, 96, 128, 3) and frames.dtype == np.uint8
    mad = np.abs(frames.astype(float) - truth[index].astype(float)).mean(axis=(1, 2, 3))
    assert mad.max() < 3.0, mad  # near-lossless encode: each frame is the requested one, not a neighbour
    neighbour = np.abs(frames[2].astype(float) - truth[32].astype(float)).mean()
    assert neighbour > mad[2] + 0.2  # the check above can tell neighbouring frames apart


def test_backends_agree_when_resizing(h264):
    path, _ = h264
    size = decode_size(probe(str(path)), 64)
    assert size == (86, 64)
    index = np.array([3, 40, 70])
    a, b = DecordReader(str(path), size).read(index), PyAVReader(str(path), size).read(index)
    assert a.shape == b.shape == (3, 64, 86, 3)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 4.0


def test_decord_fails_at_some_output_widths(h264):
    """Decord 0.6.0 returns 4-channel frames (and get_batch raises) for some target widths, e.g. 48 at
    height 32, while 46 and 50 work; auto mode falls back to PyAV for such files. If this starts passing
    the workaround can go."""
    path, _ = h264
    import decord

    vr = decord.VideoReader(str(path), width=48, height=32)
    assert vr[0].shape == (32, 48, 4)
    with pytest.raises(decord.DECORDError):
        vr.get_batch([0, 1])
    assert decord.VideoReader(str(path), width=50, height=32).get_batch([0, 1]).shape == (2, 32, 50, 3)


def _stage(tmp_path, tiny_clip_dir, videos, backend="auto"):
    spec = parse_spec(f"input: {{paths: {[str(v) for v in videos]}}}\nmodel: {{pretrained: '{tiny_clip_dir}'}}\n"
                      f"output: {{dir: '{tmp_path}/out'}}\ndecode: {{backend: {backend}}}\n"
                      "segments: {window_s: 1.0}\nsampling: {frames: 4}\n")
    return DecodeStage(spec, short_side=32)


def test_auto_falls_back_to_pyav_and_records_it(h264, tmp_path, tiny_clip_dir):
    path, _ = h264
    rows = _stage(tmp_path, tiny_clip_dir, [path])({"uri": str(path)})  # 128x96 -> 42x32: Decord copes
    assert [r["kind"] for r in rows] == ["segment"] * 3 + ["end"] and rows[-1]["n_segments"] == 3
    assert {r["backend"] for r in rows} == {"decord"}
    wide = write_video(tmp_path / "wide.mp4", render(Clip("red", "circle", "moving left", width=96, height=64)))
    rows = _stage(tmp_path, tiny_clip_dir, [wide])({"uri": str(wide)})  # 96x64 -> 48x32: Decord breaks
    assert {r["backend"] for r in rows} == {"pyav"} and rows[-1]["error_type"] == ""
    assert rows[0]["frames"].shape == (4, 32, 48, 3)


BAD_INPUTS = {
    "empty.mp4": (b"", "empty_file"),
    "text.mp4": (b"hello, this is text\n" * 20, "unreadable"),
    "random.mkv": (np.random.default_rng(0).bytes(20000), "unreadable"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_becomes_one_error_row(tmp_path, tiny_clip_dir, name):
    data, error_type = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    rows = _stage(tmp_path, tiny_clip_dir, [path])({"uri": str(path)})
    assert len(rows) == 1 and rows[0]["kind"] == "end" and rows[0]["stage"] == "decode"
    assert rows[0]["error_type"] == error_type and rows[0]["message"]


def test_audio_only_file_is_reported(tmp_path, tiny_clip_dir):
    import av

    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in s.encode(frame):
            c.mux(packet)
        c.mux(s.encode())
    with pytest.raises(DecodeError, match="no video stream"):
        probe(str(path))
    rows = _stage(tmp_path, tiny_clip_dir, [path])({"uri": str(path)})
    assert rows[0]["error_type"] == "no_video_stream"


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError) as info:
        probe(os.fspath(tmp_path / "gone.mp4"))
    assert info.value.error_type == "not_found"
