"""Decoding real encoded files into segment rows: backends, fallbacks, bad inputs, isolation."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from pipeline.config import parse_spec
from pipeline.decode import (
    DecodeError,
    DecordReader,
    PyAVReader,
    choose_backend,
    decode_size,
    decode_span,
    open_video,
    probe,
)
from pipeline.sources import local_path, stat
from pipeline.stages import DecodeStage, decode_rows
from pipeline.synth import Clip, render, write_video
from tests.conftest import write_audio_only
from tests.pipeline.test_decode_exact import FFMPEG

needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg CLI (make test installs it with apt-get)")


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    frames = render(Clip("red", "circle", "moving right", width=128, height=96, duration_s=3.0))
    path = write_video(tmp_path_factory.mktemp("h264") / "clip.mp4", frames, fps=25,
                       options={"crf": "10", "g": "30", "bf": "2", "preset": "veryfast"})
    return str(path), frames


@pytest.fixture
def spec_of(archive, tiny_clip_dir, tmp_path):
    """A spec with the given sections (YAML flow text); the input paths do not matter to decode_rows."""

    def build(**sections):
        body = {"decode": "{}", "segments": "{window_s: 1.0}", "sampling": "{frames: 4}", **sections}
        head = (f"input: {{paths: ['{archive}']}}\nmodel: {{pretrained: '{tiny_clip_dir}'}}\n"
                f"output: {{dir: '{tmp_path}'}}\n")
        return parse_spec(head + "".join(f"{k}: {v}\n" for k, v in body.items()))

    return build


def test_probe_reads_stream_facts_and_the_frame_index(h264):
    info, index = probe(h264[0])
    assert (info.width, info.height, info.codec, info.rotation) == (128, 96, "h264", 0)
    assert info.duration_s == pytest.approx(3.0, abs=0.05) and len(index.pts) == 75
    assert index.times_s[:3] == pytest.approx([0, 0.04, 0.08]) and index.end_s == pytest.approx(3.0)
    assert index.keyframes.tolist()[:3] == [index.pts[0], index.pts[30], index.pts[60]]


@pytest.mark.parametrize("reader_cls", [DecordReader, PyAVReader])
def test_backends_return_the_requested_frames(h264, reader_cls):
    path, truth = h264
    info, index = probe(path)
    index_list = np.array([0, 7, 31, 32, 60, 74])
    frames = reader_cls(path, info, index, (128, 96)).read(index_list)
    assert frames.shape == (6, 96, 128, 3) and frames.dtype == np.uint8
    mad = np.abs(frames.astype(float) - truth[index_list].astype(float)).mean(axis=(1, 2, 3))
    assert mad.max() < 3.0, mad  # near-lossless encode: each frame is the requested one, not a neighbour
    assert np.abs(frames[2].astype(float) - truth[32].astype(float)).mean() > mad[2] + 0.2


def test_backends_agree_when_resizing(h264):
    path, _ = h264
    info, index = probe(path)
    size = decode_size(info, 64)
    assert size == (86, 64)
    wanted = np.array([3, 40, 70])
    a, b = DecordReader(path, info, index, size).read(wanted), PyAVReader(path, info, index, size).read(wanted)
    assert a.shape == b.shape == (3, 64, 86, 3)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 4.0


def test_inexact_decoding_takes_the_nearest_decoded_frame(h264):
    path, truth = h264
    info, index = probe(path)
    wanted = np.arange(0, 75, 2)
    frames = PyAVReader(path, info, index, (128, 96), exact=False).read(wanted)
    best = [int(np.abs(truth.astype(float) - f.astype(float)).mean(axis=(1, 2, 3)).argmin()) for f in frames]
    error = np.abs(np.array(best) - wanted)
    assert error.max() <= 2 and error.sum() > 0  # B-frames skipped: near, not always exact


def test_decord_fails_at_some_output_widths(h264):
    """Decord 0.6.0 returns 4-channel frames (and get_batch raises) for some target widths, e.g. 48 at
    height 32, while 46 and 50 work; the reader turns that into a DecodeError and auto falls back to PyAV."""
    import decord

    path, _ = h264
    vr = decord.VideoReader(path, width=48, height=32)
    assert vr[0].shape == (32, 48, 4)
    with pytest.raises(decord.DECORDError):
        vr.get_batch([0, 1])
    assert decord.VideoReader(path, width=50, height=32).get_batch([0, 1]).shape == (2, 32, 50, 3)
    info, index = probe(path)
    with pytest.raises(DecodeError):
        DecordReader(path, info, index, (48, 32)).read(np.array([0, 1]))


def test_auto_falls_back_to_pyav_and_records_it(h264, tmp_path, spec_of):
    spec = spec_of()
    rows = list(decode_rows(h264[0], spec, 32))  # 128x96 -> 42x32: Decord copes
    assert [r["kind"] for r in rows] == ["segment"] * 3 + ["end"] and rows[-1]["n_segments"] == 3
    assert {r["backend"] for r in rows} == {"decord"}
    wide = write_video(tmp_path / "wide.mp4", render(Clip("red", "circle", "moving left", width=96, height=64)))
    rows = list(decode_rows(str(wide), spec, 32))  # 96x64 -> 48x32: Decord breaks, PyAV takes over
    assert {r["backend"] for r in rows} == {"pyav"} and rows[-1]["error_type"] == ""
    assert rows[0]["frames"].shape == (4, 32, 48, 3)


@pytest.fixture(scope="module")
def camera_h264(tmp_path_factory):
    """8 s of H.264 as the ffmpeg CLI writes it (x264, 3 B-frames, a keyframe every 2 s), index at the front."""
    path = tmp_path_factory.mktemp("cli") / "camera.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "8",
                    "-c:v", "libx264", "-g", "50", "-bf", "3", "-pix_fmt", "yuv420p", "-movflags", "+faststart",
                    str(path)], check=True)
    return path


def _packet_positions(path) -> list[int]:
    """File offset of each video packet, in decoding order."""
    import av

    with av.open(str(path)) as container:
        return [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]


def _ffmpeg_all(path, size: tuple[int, int]) -> np.ndarray:
    """Every frame as the ffmpeg CLI decodes it, rgb24 ``[N, H, W, 3]``."""
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size[1], size[0], 3)


def _exact(frames: np.ndarray, reference: np.ndarray) -> bool:
    """Each frame is the reference's (decoders agree to rounding), not a neighbour."""
    return bool(np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean(axis=(1, 2, 3)).max() <= 1.0)


@needs_ffmpeg
def test_auto_reads_a_file_decord_cannot_open_with_pyav(camera_h264, tmp_path):
    """A copy cut short inside a packet of the third GOP (its index still names every frame): Decord refuses to open
    it; auto gives PyAV's frames of the first two GOPs, which are ffmpeg's; asked for Decord by name, an error."""
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(camera_h264.read_bytes()[:_packet_positions(camera_h264)[120] + 100])
    info, index = probe(str(cut))
    wanted = np.arange(100)  # keyframes at 0, 50, 100
    assert len(index.pts) > 100 and choose_backend(info, "auto", exact=True) == "decord"
    with pytest.raises(DecodeError, match="decord cannot open"):
        open_video(str(cut), info, index, (160, 120), backend="decord", requested="decord")
    reader = open_video(str(cut), info, index, (160, 120), backend="decord", requested="auto")
    frames = reader.read(wanted)
    assert reader.name == "pyav"
    assert np.array_equal(frames, PyAVReader(str(cut), info, index, (160, 120)).read(wanted))
    assert _exact(frames, _ffmpeg_all(camera_h264, (160, 120))[wanted])  # the frames before the cut are intact
    clip, times = decode_span(str(cut), 0.0, 3.9, 40, 120)  # a labelled clip, dense enough that auto picks Decord
    picks = np.searchsorted(index.times_s, times)
    assert np.array_equal(clip, frames[picks]) and len(np.unique(picks)) == 40
    with pytest.raises(DecodeError):
        decode_span(str(cut), 0.0, 3.9, 40, 120, backend="decord")


@needs_ffmpeg
def test_auto_reads_with_pyav_from_the_read_decord_fails_on(tmp_path):
    """Decord opens the file, then fails on every read at this output size (4-channel frames at width 48):
    the reader says decord until the read, then pyav, and the frames are PyAV's."""
    path = tmp_path / "wide.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-t", "2", "-c:v",
                    "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    info, index = probe(str(path))
    size = decode_size(info, 32)
    assert size == (48, 32)
    reader = open_video(str(path), info, index, size, backend="decord", requested="auto")
    assert reader.name == "decord"
    wanted = np.arange(0, len(index.pts), 2)
    frames = reader.read(wanted)
    assert reader.name == "pyav" and frames.shape == (len(wanted), 32, 48, 3)
    assert np.array_equal(frames, PyAVReader(str(path), info, index, size).read(wanted))
    assert np.array_equal(reader.served_pts, index.pts[wanted])


@needs_ffmpeg
def test_damage_mid_file_is_read_by_decord_before_it_and_pyav_from_it_on(camera_h264, tmp_path):
    """One packet of the second GOP with a broken NAL length (hand-made damage): Decord serves the chunks before
    it; at the damage PyAV takes over, tries it too and names its own reason; the next GOP is PyAV's, exact."""
    positions = _packet_positions(camera_h264)
    data = bytearray(camera_h264.read_bytes())
    data[positions[90]:positions[90] + 4] = b"\xff\xff\xff\xff"  # the 91st packet in decoding order
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    info, index = probe(str(damaged))
    reference = _ffmpeg_all(camera_h264, (160, 120))  # of the intact file
    reader = open_video(str(damaged), info, index, (160, 120), backend="decord", requested="auto")
    for first, last in ((0, 10), (40, 50)):
        frames = reader.read(np.arange(first, last))
        assert reader.name == "decord" and _exact(frames, reference[first:last])
    with pytest.raises(DecodeError) as failure:
        reader.read(np.arange(50, 100))
    assert failure.value.error_type == "corrupt" and reader.name == "pyav"  # PyAV's reason: it tried too
    later = np.arange(100, 150)
    frames = reader.read(later)
    assert reader.name == "pyav" and _exact(frames, reference[100:150])
    assert np.array_equal(frames, PyAVReader(str(damaged), info, index, (160, 120)).read(later))
    reader.close()


def test_sampling_strategies(h264, tmp_path, spec_of):
    fps = list(decode_rows(h264[0], spec_of(sampling="{strategy: fps, target_fps: 5}"), 32))
    assert [len(r["frame_times_s"]) for r in fps[:-1]] == [5, 5, 5]
    assert np.diff(fps[0]["frame_times_s"]) == pytest.approx([0.2] * 4)
    tsn = spec_of(sampling="{strategy: tsn, frames: 4, seed: 3}")
    a, b = list(decode_rows(h264[0], tsn, 32)), list(decode_rows(h264[0], tsn, 32))
    assert [r["frame_times_s"].tolist() for r in a] == [r["frame_times_s"].tolist() for r in b]  # deterministic
    uniform = list(decode_rows(h264[0], spec_of(), 32))
    assert a[0]["frame_times_s"].tolist() != uniform[0]["frame_times_s"].tolist()
    for r in a[:-1]:  # one frame on screen in each quarter of its segment (frames are 0.04 s long)
        offset = r["frame_times_s"] - r["start_s"]
        assert (offset > np.arange(4) * 0.25 - 0.041).all() and (offset < np.arange(1, 5) * 0.25).all()


def test_shot_boundaries_of_a_video_made_of_three_sources(tmp_path, spec_of):
    scenes = [("red", "circle", "moving left", 2.0), ("blue", "square", "growing", 3.0),
              ("yellow", "triangle", "moving up", 2.0)]
    parts = [render(Clip(c, s, m, width=96, height=64, duration_s=d, noise=20, seed=i))
             for i, (c, s, m, d) in enumerate(scenes)]
    parts[1] = (parts[1] * 0.5).astype(np.uint8)  # a darker scene
    path = write_video(tmp_path / "three.mp4", np.concatenate(parts), fps=25)
    spec = spec_of(segments="{mode: shots, window_s: 10.0}")
    rows = list(decode_rows(str(path), spec, 32))[:-1]
    assert [t for r in rows for t in (r["start_s"], r["end_s"])] == pytest.approx([0, 2, 2, 5, 5, 7], abs=0.041)
    long_shots = spec_of(segments="{mode: shots, window_s: 1.5, min_segment_s: 0.4}")
    spans = [t for r in list(decode_rows(str(path), long_shots, 32))[:-1] for t in (r["start_s"], r["end_s"])]
    assert spans == pytest.approx([0, 1.5, 1.5, 2, 2, 3.5, 3.5, 5, 5, 6.5, 6.5, 7], abs=0.041)


BAD_INPUTS = {
    "empty.mp4": (b"", "empty_file"),
    "text.mp4": (b"hello, this is text\n" * 20, "unreadable"),
    "random.mkv": (np.random.default_rng(0).bytes(20000), "unreadable"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_becomes_one_error_row(tmp_path, spec_of, name):
    data, error_type = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    rows = list(decode_rows(str(path), spec_of(), 32))
    assert len(rows) == 1 and rows[0]["kind"] == "end" and rows[0]["stage"] == "decode"
    assert rows[0]["error_type"] == error_type and rows[0]["message"]


def test_audio_only_and_still_image_files(tmp_path, spec_of):
    audio = write_audio_only(tmp_path / "audio.m4a")
    image = tmp_path / "photo.jpg"
    Image.fromarray(render(Clip("red", "circle", "growing"))[0]).save(image)
    spec = spec_of()
    (row,) = decode_rows(str(audio), spec, 32)
    assert row["error_type"] == "no_video_stream" and "audio" in row["message"]
    (row,) = decode_rows(str(image), spec, 32)
    assert row["error_type"] == "still_image"


def test_truncated_file_keeps_its_first_part_and_records_the_truncation(h264, tmp_path, spec_of):
    cut = tmp_path / "cut.mp4"
    write_video(tmp_path / "full.mp4", render(Clip("red", "circle", "moving right", width=128, height=96,
                                                   duration_s=6.0)), container_options={"movflags": "faststart"})
    full = (tmp_path / "full.mp4").read_bytes()
    cut.write_bytes(full[:len(full) // 2])  # index at the front, second half of the frames gone
    rows = list(decode_rows(str(cut), spec_of(), 32))
    segments, end = rows[:-1], rows[-1]
    assert 1 <= len(segments) < 6 and end["n_segments"] == len(segments)
    assert end["error_type"] == "truncated" and end["stage"] == "decode"


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError) as info:
        probe(os.fspath(tmp_path / "gone.mp4"))
    assert info.value.error_type == "not_found"


def _stalling_fifo(path, head: bytes) -> threading.Thread:
    """A named pipe that delivers the first bytes of a real video, then nothing: the demuxer blocks in read()."""
    os.mkfifo(path)

    def writer():
        with open(path, "wb") as f:
            f.write(head)
            f.flush()
            time.sleep(30)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def test_a_stalled_decoder_is_ended_at_the_timeout_and_the_next_video_decodes(h264, tmp_path, spec_of):
    spec = spec_of(decode="{timeout_s: 3}")
    stage = DecodeStage(spec, short_side=32)
    _stalling_fifo(tmp_path / "stall.mp4", open(h264[0], "rb").read()[:2000])
    started = time.monotonic()
    (row,) = stage({"uri": str(tmp_path / "stall.mp4")})
    assert row["error_type"] == "timeout" and "decode.timeout_s" in row["message"]
    assert 3 <= time.monotonic() - started < 15
    rows = list(stage({"uri": h264[0]}))  # a fresh decoder process serves the next video
    assert rows[-1]["error_type"] == "" and rows[-1]["n_segments"] == 3


def test_a_crash_in_the_decoder_costs_only_that_video(h264, tmp_path, spec_of):
    spec = spec_of(decode="{timeout_s: 30}")
    stage = DecodeStage(spec, short_side=32)
    assert list(stage({"uri": h264[0]}))[-1]["n_segments"] == 3
    _stalling_fifo(tmp_path / "stall.mp4", open(h264[0], "rb").read()[:2000])
    threading.Timer(1.0, lambda: os.kill(stage._decoder.pid, signal.SIGSEGV)).start()
    (row,) = stage({"uri": str(tmp_path / "stall.mp4")})
    assert row["error_type"] == "decoder_crashed" and "-11" in row["message"]
    assert list(stage({"uri": h264[0]}))[-1]["n_segments"] == 3


@pytest.mark.slow
def test_decode_worker_memory_stays_flat_over_500_videos(tmp_path, spec_of):
    """RSS of the worker plus its decoder process, after 50 and after 500 videos (the decoder is recycled)."""
    videos = [write_video(tmp_path / f"v{i}.mp4", render(Clip("red", "circle", "moving left", width=64, height=48,
                                                              duration_s=0.5, seed=i)), fps=10) for i in range(20)]
    stage = DecodeStage(spec_of(decode="{recycle_after: 100}"), short_side=32)

    def rss() -> int:
        pids = [os.getpid()] + ([stage._decoder.pid] if stage._decoder and stage._decoder.pid else [])
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        return total

    samples = {}
    for i in range(500):
        rows = list(stage({"uri": str(videos[i % 20])}))
        assert rows[-1]["error_type"] == ""
        if i + 1 in (50, 250, 500):
            samples[i + 1] = rss()
    assert samples[500] <= samples[50] * 1.10, samples


def test_long_videos_are_decoded_a_chunk_at_a_time(tmp_path, spec_of):
    """Rows stream out as chunks decode: the memory held is set by decode.chunk_segments, not the video length."""
    def peak(seconds: float) -> tuple[int, int]:
        clip = Clip("red", "circle", "moving left", width=160, height=96, duration_s=seconds, fps=10)
        path = write_video(tmp_path / f"long{seconds}.mp4", render(clip), fps=10)
        spec = spec_of(decode="{chunk_segments: 4}", segments="{window_s: 1.0}", sampling="{frames: 4}")
        tracemalloc.start()
        rows = 0
        for _ in decode_rows(str(path), spec, 96):  # each row is dropped as soon as it is counted
            rows += 1
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, rows

    short, n_short = peak(8.0)
    long, n_long = peak(80.0)
    assert (n_short, n_long) == (9, 81)
    assert long < short * 1.5, (short, long)  # 10x the video, about the same peak


def test_a_filesystem_uri_is_decoded_like_a_path(h264, spec_of):
    """Decoding goes through pyarrow.fs for URIs (file:// here; s3:// and others take the same path)."""
    uri = f"file://{h264[0]}"
    rows = list(decode_rows(uri, spec_of(), 32))
    assert rows[-1]["error_type"] == "" and rows[-1]["n_segments"] == 3 and rows[0]["uri"] == uri
    assert stat(uri) == stat(h264[0])
    with local_path(uri) as path:
        assert path == h264[0]
