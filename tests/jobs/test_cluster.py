"""Ray at archive scale, for real: a two-node cluster, a worker killed mid-run, a driver killed mid-run and
re-run, and a mixed archive of codecs and broken files. Every comparison is against a clean local run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.synth import Clip, render, write_video
from pipeline.writer import read_table
from tests.conftest import write_audio_only

pytestmark = pytest.mark.slow
REELTAG = [sys.executable, "-m", "jobs.cli"]
REPO = Path(__file__).resolve().parents[2]


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


SLOW = ["--set", "tower.levels=[1,2,3]", "--set", "tower.fusion=mean", "--set", "sampling.frames=16"]  # 21 views a
# frame: slow enough to be stopped mid-run


@pytest.fixture(scope="module")
def slow_clean(tmp_path_factory, config) -> dict:
    out = tmp_path_factory.mktemp("slow") / "out"
    run(config, out, *SLOW)
    return rows_of(out)


def test_a_run_killed_with_sigkill_and_run_again_loses_and_duplicates_nothing(config, slow_clean, tmp_path):
    out = tmp_path / "out"
    job = run(config, out, *SLOW, wait=False)
    _wait_for(lambda: list((out / "manifest").glob("*.parquet")), timeout=300)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started, as when a machine goes down
    job.wait()
    partial = rows_of(out)
    assert 0 < len(partial) < 40
    again = run(config, out, *SLOW)
    assert "already done" in again.stdout
    assert_same(rows_of(out), slow_clean)


def test_a_stage_left_without_resources_mid_run_is_named_and_the_job_stops(config, slow_clean, tmp_path):
    """Two 1-CPU nodes (and a head without CPUs): the encoder actor holds one, decode tasks run on the other. That
    node is lost mid-run: the decode stage can never be scheduled again. The job says so in one line and exits 2
    (was: waited for ever, silently); what it committed is kept, and a re-run on a whole cluster finishes it."""
    import ray
    from ray._private.state import state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        job = run(config, out, *SLOW, "--set", f"ray.address={cluster.address}", "--set", "ray.unschedulable_s=5",
                  wait=False)
        _wait_for(lambda: list((out / "manifest").glob("*.parquet")), timeout=300)
        ray.init(address=cluster.address, log_to_driver=False)
        (encoder,) = [a["Address"]["NodeID"] for a in state.actor_table(None).values()
                      if "(_RayEncode)" in a["ActorClassName"] and a["State"] == "ALIVE"]
        (decoder,) = [n for n in nodes if n.node_id != encoder]
        cluster.remove_node(decoder)
        started = time.monotonic()
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("reeltag")]
        assert lines == ["reeltag: ray: the decode stage has waited 5 s for a decode task of 1 CPU that Ray cannot "
                         "place: a node was lost or the cluster is busy with other jobs; what was committed is kept, "
                         "run again when it has room (ray.unschedulable_s)".replace(
                             "1 CPU that", "1 CPU (free now: 0 of 1 CPUs) that")], stderr
        assert time.monotonic() - started < 60 and "Traceback" not in stderr
        kept = rows_of(out)
        assert 0 < len(kept) < 40
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run(config, out, *SLOW, "--set", f"ray.address={cluster.address}")
        assert_same(rows_of(out), slow_clean)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI is not installed")
def test_a_long_video_killed_mid_way_leaves_nothing_seen_and_is_done_again_exactly(config, tmp_path):
    """A 40 s file made by the ffmpeg CLI, 40 windows, committed 4 rows at a time in parts: the job is SIGKILLed
    once parts are on disk and before the commit; readers see none of it, the re-run removes the dead parts and
    gives exactly a clean run's rows."""
    root = tmp_path / "long"
    root.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=15:duration=40",
                    "-c:v", "libx264", "-g", "30", "-pix_fmt", "yuv420p", str(root / "long.mp4")], check=True)
    slow = ["--set", f"input.paths=[{root}]", *SLOW]
    reference = tmp_path / "clean"
    run(config, reference, *slow)
    out = tmp_path / "out"
    job = run(config, out, *slow, wait=False)

    def uncommitted() -> set[str]:
        return {p.name for p in (out / "segments").glob("part-*.parquet")} - \
            {p.name for p in (out / "manifest").glob("part-*.parquet")}

    _wait_for(lambda: (out / "segments").is_dir() and uncommitted(), timeout=300)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    if not list((out / "manifest").glob("part-*.parquet")):  # killed before the commit (its usual place)
        assert read_table(out, "segments").num_rows == 0 and uncommitted()
    run(config, out, *slow)
    assert_same(rows_of(out), rows_of(reference))
    assert len(rows_of(out)) == 40
    (commit,) = read_table(out, "manifest").to_pylist()
    named = {*commit["parts"], *(p.name for p in (out / "manifest").glob("part-*.parquet"))}
    shards = {p.name for p in (out / "segments").glob("part-*.parquet")}
    assert set(commit["parts"]) <= shards <= named  # no dead part left
    assert len(commit["parts"]) >= 9  # 40 rows, 4 at a time (and the last few with the commit)


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


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:  # all bound at once, so the ports are distinct
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _readme_cluster_commands() -> list[str]:
    """The bash block of the README's "Running on a Ray cluster" section, one command a line, comments dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Running on a Ray cluster\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def _substitute(command: str, placeholder: str, value: str) -> str:
    assert placeholder in command, f"the README's {command!r} has no {placeholder!r}"
    return command.replace(placeholder, value)


def _session_processes(sid: int) -> set[int]:
    """Every process in session `sid` and every descendant of one (a Ray job's driver runs in a session of its own)."""
    parents = {}
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text() if name.isdigit() else None
        except OSError:
            continue
        if stat:
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            parents[int(name)] = (int(fields[1]), int(fields[3]))
    found = {pid for pid, (_, session) in parents.items() if session == sid}
    while more := {pid for pid, (ppid, _) in parents.items() if ppid in found} - found:
        found |= more
    return found


def _kill_session(sid: int) -> None:
    """Kills what one `ray start` started, and nothing else (`ray stop` would stop every Ray on the machine)."""
    for pid in _session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_for(lambda: not _session_processes(sid), timeout=30)


def test_the_readme_cluster_commands_submit_a_run_with_token_auth_on(config, clean, tmp_path):
    """The README's cluster example as written, Ray's token authentication on: `ray get-auth-token --generate` and
    `RAY_AUTH_MODE=token ray start --head` for the head, then the `export` line and `ray job submit` from a client
    whose home has no token (the token comes from the export only), and a submit without the export is refused."""
    generate, start_head, export, start_node, submit = _readme_cluster_commands()
    assert start_node.startswith("ray start --address HEAD:")  # not run: Ray puts a second node on a non-loopback IP
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, RAY_AUTH_* from here
    base.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # a single node on 127.0.0.1, not on this machine's own IP
    (tmp_path / "head").mkdir()
    (tmp_path / "client").mkdir()
    head_env, client_env = {**base, "HOME": str(tmp_path / "head")}, {**base, "HOME": str(tmp_path / "client")}
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    start_head += (f" --port={gcs} --dashboard-host=127.0.0.1 --dashboard-port={dashboard} --include-dashboard=true"
                   f" --ray-client-server-port={client} --dashboard-agent-listen-port={agent}"
                   f" --dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={runtime_env}"
                   f" --metrics-export-port={metrics} --node-manager-port={node_manager}"
                   f" --object-manager-port={object_manager} --num-cpus=2 --temp-dir={temp_dir}")
    submit = _substitute(_substitute(submit, "http://HEAD:8265", f"http://127.0.0.1:{dashboard}"),
                         "configs/tag_clip.yaml", f"{config} --set output.dir={tmp_path / 'out'}")

    def bash(command: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], env=env, cwd=REPO, capture_output=True, text=True, **kwargs)

    token = bash(generate, head_env, timeout=60)
    assert token.returncode == 0 and (tmp_path / "head/.ray/auth_token").read_text() == token.stdout, token.stderr
    head = subprocess.Popen(["bash", "-c", start_head], env=head_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own session: see finally
    try:
        started, _ = head.communicate(timeout=180)
        assert head.returncode == 0, started
        refused = bash(submit.replace(str(tmp_path / "out"), str(tmp_path / "refused")), client_env, timeout=120)
        assert refused.returncode != 0, refused.stdout  # no token sent: Ray's default must not be "no auth"
        assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in \
            refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists()
        export = _substitute(export, "=TOKEN", "=" + shlex.quote(token.stdout))
        job = bash(f"{export}\n{submit}", client_env, timeout=600)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "succeeded" in job.stdout and "10 videos: 10 ok" in job.stdout
        summary = json.loads((tmp_path / "out/run.json").read_text())
        assert summary["videos_ok"] == 10
        assert_same(rows_of(tmp_path / "out"), clean)
    finally:
        if head.returncode is None:
            head.kill()
            head.wait()
        _kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
