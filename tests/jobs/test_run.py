"""``reeltag`` end to end in a subprocess, on an embedded local Ray, with real Parquet output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.writer import read_table

REELTAG = [sys.executable, "-m", "jobs.cli"]


def reeltag(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*REELTAG, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def config(tmp_path, archive, tiny_clip_dir, vocab_file) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""\
input:
  paths: [{archive}]
segments:
  mode: window
  window_s: 2.0
sampling:
  frames: 4
model:
  family: clip
  pretrained: {tiny_clip_dir}
  dtype: float32
tags:
  vocabulary: {vocab_file}
  prompts: ["a video of a {{}}.", "a {{}}."]
  top_k: 3
output:
  dir: {tmp_path / 'out'}
ray:
  num_cpus: 2
""")
    return path


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "reeltag"
    assert script.exists(), "pip install -e . should install the reeltag console script"
    assert "validate" in subprocess.run([script, "--help"], capture_output=True, text=True).stdout


def test_validate(config, archive):
    ok = reeltag("validate", config)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 4 videos, window segments of 2 s")
    assert len(ok.stdout.strip().splitlines()) == 1
    bad = reeltag("validate", config, "--set", "segments.window_s=-2", "--set", "sampling.frames=many")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--set segments.window_s: must be at least 0.01 s (a frame), got -2" in bad.stderr
    assert "--set sampling.frames: expected a whole number, got a string" in bad.stderr
    config.write_text(config.read_text().replace("top_k: 3", "top_k: 0"))
    bad = reeltag("validate", config)
    assert bad.returncode == 2 and f"{config}:15 tags.top_k: must be > 0 and at most 10000, got 0" in bad.stderr


@pytest.mark.slow
def test_run_writes_tagged_segments_and_errors_and_reruns_without_duplicates(config, tmp_path):
    first = reeltag("run", config)
    assert first.returncode == 0, first.stderr
    assert "4 videos: 3 ok, 1 failed (unreadable 1)" in first.stdout and "Traceback" not in first.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "run.json").read_text())
    assert (summary["videos_ok"], summary["videos_failed"], summary["segments"]) == (3, 1, 6)
    assert summary["model"].startswith("clip:") and len(summary["config_hash"]) == 16 and summary["wall_s"] > 0

    shard = pq.read_table(next((out / "segments").glob("*.parquet")))
    assert shard.schema.names == ["video_id", "uri", "segment_id", "start_s", "end_s", "frame_times_s", "embedding",
                                  "tags", "region_tags", "backend", "model", "config_hash"]
    assert shard.schema.field("tags").type.value_type == pa.struct([("label", pa.string()), ("score", pa.float32()),
                                                                    ("confidence", pa.float32())])
    assert shard.schema.field("embedding").type.value_type == pa.float32()

    segments = read_table(out, "segments").to_pylist()
    windows = sorted((Path(r["uri"]).name, r["segment_id"], r["start_s"], round(r["end_s"], 2)) for r in segments)
    assert windows == [("clip0.mp4", 0, 0.0, 2.0), ("clip0.mp4", 1, 2.0, 4.0), ("clip0.mp4", 2, 4.0, 5.0),
                       ("clip1.mp4", 0, 0.0, 2.0), ("clip1.mp4", 1, 2.0, 3.0), ("clip2.mp4", 0, 0.0, 2.0)]
    emb = np.array([r["embedding"] for r in segments])
    assert emb.shape == (6, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len({tuple(e.round(5)) for e in emb}) == 6  # different content, different embeddings
    for r in segments:
        scores = [t["score"] for t in r["tags"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
        assert all(0 <= t["confidence"] <= 1 for t in r["tags"]) and r["region_tags"] == []
        assert len(r["frame_times_s"]) == 4 and r["start_s"] <= min(r["frame_times_s"]) < r["end_s"]

    (error,) = read_table(out, "errors").to_pylist()
    assert Path(error["uri"]).name == "broken.mp4" and error["stage"] == "decode"
    assert error["error_type"] == "unreadable" and "Invalid data" in error["message"]

    again = reeltag("run", config)  # re-run: everything is finished, nothing is decoded or duplicated
    assert again.returncode == 0 and "4 already done" in again.stdout
    assert read_table(out, "segments").num_rows == 6 and read_table(out, "errors").num_rows == 1


@pytest.mark.slow
def test_job_that_cannot_run_exits_1_with_a_clear_message(config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = reeltag("run", config, "--set", f"output.dir={blocker}/out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"output.dir '{blocker}/out' is not writable" in result.stderr
    (tmp_path / "empty-model").mkdir()
    result = reeltag("run", config, "--set", f"model.pretrained={tmp_path}/empty-model")
    assert result.returncode == 1 and "cannot load the clip checkpoint" in result.stderr


def test_a_second_run_into_a_held_output_dir_exits_2_naming_the_holder(config, tmp_path):
    from pipeline.writer import output_lock

    out = tmp_path / "held"
    out.mkdir()
    with output_lock(out):
        result = reeltag("run", config, "--set", f"output.dir={out}")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"reeltag: output.dir {out} is in use by reeltag pid ") and "--wait" in line
    assert not (out / "segments").exists()  # nothing was touched


@pytest.mark.slow
def test_the_default_plan_runs_on_one_cpu_and_an_impossible_one_is_refused(config, tmp_path):
    """With ray.num_cpus: 1 the encoder actor took the only CPU and no decode task was ever scheduled: no output,
    no error, for ever. The default plan now fits the cluster; an explicit one that cannot run exits 2."""
    one = subprocess.run([*REELTAG, "run", str(config), "--set", f"output.dir={tmp_path / 'one'}", "--set",
                          "ray.num_cpus=1"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert json.loads((tmp_path / "one" / "run.json").read_text())["videos_ok"] == 3
    stuck = reeltag("run", config, "--set", f"output.dir={tmp_path / 'stuck'}", "--set", "ray.encoder_actors=2",
                    "--set", "ray.encoder_cpus=1")
    assert stuck.returncode == 2, stuck.stderr
    (line,) = stuck.stderr.strip().splitlines()
    assert "the job would wait for ever" in line and "ray.encoder_actors" in line


@pytest.mark.slow
def test_a_hang_is_retried_on_the_next_runs_up_to_max_attempts(config, archive, tmp_path):
    """A FIFO nobody writes to hangs its decoder (a transient failure: timeout); the broken file is the file's own
    failure. Run 1 records both, run 2 tries the hang again (attempt 2) but not the broken file, run 3 leaves the
    hang final (decode.max_attempts: 2) and does nothing; --retry-failed does both again."""
    import os

    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{fifo}\n{archive / 'broken.mp4'}\n")
    out = tmp_path / "retry"
    args = ["--set", f"output.dir={out}", "--set", "input.paths=[]", "--set", f"input.manifest={manifest}",
            "--set", "decode.timeout_s=2", "--set", "decode.max_attempts=2"]

    def run(*extra: str) -> dict:
        result = reeltag("run", config, *args, *extra)
        assert result.returncode == 0, result.stderr
        return json.loads((out / "run.json").read_text())

    first = run()
    assert first["errors_by_type"] == {"timeout": 1, "unreadable": 1} and first["videos_skipped"] == 0
    second = run()
    assert second["errors_by_type"] == {"timeout": 1} and second["videos_skipped"] == 1
    attempts: dict = {}
    for r in read_table(out, "manifest").to_pylist():
        attempts.setdefault(Path(r["uri"]).name, []).append(r["attempts"])
    assert {k: sorted(v) for k, v in attempts.items()} == {"stalled.mp4": [1, 2], "broken.mp4": [1]}
    assert run()["videos_skipped"] == 2
    assert run("--retry-failed")["errors_by_type"] == {"timeout": 1, "unreadable": 1}
