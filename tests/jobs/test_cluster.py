"""Ray at archive scale, for real: a two-node cluster, a worker killed mid-run, a driver killed mid-run and
re-run, and a mixed archive of codecs and broken files. Every comparison is against a clean local run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.synth import Clip, render, write_video
from pipeline.writer import read_table
from tests.conftest import write_audio_only

pytestmark = pytest.mark.slow
REELTAG = [sys.executable, "-m", "jobs.cli"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(10):
        clip = Clip(["red", "blue", "green"][i % 3], ["circle", "square"][i % 2], "moving left", width=64, height=48,
                    fps=15, duration_s=4.0, seed=i)
        write_video(root / f"v{i:02d}.mp4", render(clip), fps=15)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory, videos, tiny_clip_dir, vocab_file) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "pipeline.yaml"
    path.write_text(f"input: {{paths: ['{videos}']}}\nsegments: {{window_s: 1.0}}\nsampling: {{frames: 4}}\n"
                    f"model: {{pretrained: '{tiny_clip_dir}', dtype: float32}}\n"
                    f"tags: {{vocabulary: '{vocab_file}'}}\noutput: {{dir: unused, shard_rows: 4}}\n"
                    "ray: {num_cpus: 2}\n")
    return path


def run(config: Path, out: Path, *extra: str, wait: bool = True):
    args = [*REELTAG, "run", str(config), "--set", f"output.dir={out}", *extra]
    if not wait:  # in its own session, so the whole job (driver and its local Ray) can be killed together
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def rows_of(out: Path) -> dict:
    """(video, segment) -> embedding of every committed segment; asserts there is no duplicate."""
    table = read_table(out, "segments")
    keys = list(zip(table["video_id"].to_pylist(), table["segment_id"].to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate segment rows"
    return dict(zip(keys, (np.array(e) for e in table["embedding"].to_pylist())))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, config) -> dict:
    out = tmp_path_factory.mktemp("clean") / "out"
    run(config, out)
    rows = rows_of(out)
    assert len(rows) == 40  # 10 videos x 4 one-second windows
    return rows


def test_two_node_cluster_places_work_on_both_nodes_and_matches_a_local_run(config, clean, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, resources={"second": 1})  # distinct resources: 1 CPU + a custom one
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        run(config, out, "--set", f"ray.address={cluster.address}")
        summary = json.loads((out / "run.json").read_text())
        nodes = set(summary["videos_by_node"]) | set(summary["segments_by_encoder_node"])
        assert len(nodes) == 2, summary  # the encoder actor holds one node's CPU, decode tasks run on the other
        assert_same(rows_of(out), clean)
    finally:
        cluster.shutdown()


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if pattern in line]


def test_an_encoder_worker_killed_mid_run_is_restarted_and_the_output_is_identical(config, clean, tmp_path):
    out = tmp_path / "out"
    job = run(config, out, wait=False)
    _wait_for(lambda: _pids("MapBatches(_RayEncode)") and list((out / "manifest").glob("*.parquet")))
    (victim,) = _pids("MapBatches(_RayEncode)")
    os.kill(victim, signal.SIGKILL)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr
    assert_same(rows_of(out), clean)


def test_a_run_killed_with_sigkill_and_run_again_loses_and_duplicates_nothing(config, tmp_path):
    slow = ["--set", "tower.levels=[1,2,3]", "--set", "tower.fusion=mean", "--set", "sampling.frames=16"]
    reference = tmp_path / "clean"  # 21 views a frame: slow enough to be killed mid-run
    run(config, reference, *slow)
    out = tmp_path / "out"
    job = run(config, out, *slow, wait=False)
    _wait_for(lambda: list((out / "manifest").glob("*.parquet")), timeout=300)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started, as when a machine goes down
    job.wait()
    partial = rows_of(out)
    assert 0 < len(partial) < 40
    again = run(config, out, *slow)
    assert "already done" in again.stdout
    assert_same(rows_of(out), rows_of(reference))


def test_a_mixed_archive_tags_every_good_video_and_records_every_bad_one(config, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    frames = render(Clip("red", "circle", "moving right", width=64, height=48, fps=15, duration_s=2.0))
    good = {"h264.mp4": ("libx264", "yuv420p"), "hevc.mkv": ("libx265", "yuv420p"), "vp8.webm": ("libvpx", "yuv420p"),
            "vp9.webm": ("libvpx-vp9", "yuv420p"), "mpeg4.avi": ("mpeg4", "yuv420p"),
            "mjpeg.mov": ("mjpeg", "yuvj420p")}
    for name, (codec, pix) in good.items():
        write_video(root / name, frames, fps=15, codec=codec, pix_fmt=pix, options={})
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 10)
    (root / "random.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    write_video(root / "long.mp4", np.concatenate([frames] * 4), fps=15, container_options={"movflags": "faststart"})
    data = (root / "long.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (root / "long.mp4").unlink()
    write_audio_only(root / "audio.m4a")
    from PIL import Image

    Image.fromarray(frames[0]).save(root / "still.jpg")
    out = tmp_path / "out"
    result = run(config, out, "--set", f"input.paths=[{root}]", "--set",
                 "input.extensions=[.mp4, .mkv, .webm, .avi, .mov, .m4a, .jpg]")
    summary = json.loads((out / "run.json").read_text())
    assert summary["videos_total"] == 12, summary
    tagged = {Path(u).name for u in read_table(out, "segments")["uri"].to_pylist()}
    assert set(good) <= tagged  # every good video, whatever its codec
    errors = {Path(r["uri"]).name: r["error_type"] for r in read_table(out, "errors").to_pylist()}
    assert errors == {"empty.mp4": "empty_file", "text.mp4": "unreadable", "random.mkv": "unreadable",
                      "truncated.mp4": "truncated", "audio.m4a": "no_video_stream", "still.jpg": "still_image"}
    assert "truncated.mp4" in tagged  # its first half is kept
    assert (summary["videos_ok"], summary["videos_failed"]) == (6, 6) and result.returncode == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_same_command_on_a_cluster(config, clean, tmp_path):
    """The README's cluster example: `ray start --head`, then `ray job submit --working-dir . -- reeltag run`."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # a throwaway loopback cluster; real clusters keep token auth
    ray_cli = str(Path(sys.executable).parent / "ray")
    gcs, dashboard = _free_port(), _free_port()
    subprocess.run([ray_cli, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"], env=env, check=True,
                   capture_output=True, timeout=180)
    try:
        out = tmp_path / "out"
        job = subprocess.run([ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                              str(repo), "--", "reeltag", "run", str(config), "--set", f"output.dir={out}"],
                             env=env, capture_output=True, text=True, timeout=600, cwd=repo)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "succeeded" in job.stdout and "10 videos: 10 ok" in job.stdout
        summary = json.loads((out / "run.json").read_text())
        assert summary["videos_ok"] == 10
        assert_same(rows_of(out), clean)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
