"""Output shards: whole videos per shard, finished videos read back from the shards, actions from windows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_spec
from pipeline.stages import decode_rows
from pipeline.writer import STREAM_SCHEMA, OutputWriter, latest_config, read_table, write_actions
from temporal.localize import localize_videos

REPO = Path(__file__).resolve().parents[2]


def _segment(vid, i, start, end, tags):
    return {"kind": "segment", "video_id": vid, "uri": f"/v/{vid}.mp4", "segment_id": i, "n_segments": 0,
            "start_s": start, "end_s": end, "frame_times_s": [start], "embedding": [1.0, 0.0], "backend": "pyav",
            "tags": [{"label": k, "score": 0.5, "confidence": v} for k, v in tags.items()], "region_tags": [],
            "stage": "", "error_type": "", "message": ""}


def _done(writer: OutputWriter) -> set[tuple[str, str]]:
    """(video id, fingerprint) of each video's latest commit for the writer's config."""
    return {(vid, c["fingerprint"]) for vid, c in writer.commits().items()}


def _end(vid, n, error=""):
    return {"kind": "end", "video_id": vid, "uri": f"/v/{vid}.mp4", "n_segments": n, "error_type": error,
            "stage": "decode" if error else "", "message": error}


def test_a_video_is_written_only_when_all_its_rows_are_in(tmp_path):
    writer = OutputWriter(tmp_path, config_hash="h1", model="m", shard_rows=1000)
    assert writer.add(pa.Table.from_pylist([_segment("a", 0, 0, 2, {}), _end("b", 0, "unreadable")],
                                           schema=STREAM_SCHEMA)) == ["b"]
    assert writer.add(pa.Table.from_pylist([_end("a", 2), _segment("a", 1, 2, 4, {})], schema=STREAM_SCHEMA)) == ["a"]
    writer.flush()
    assert read_table(tmp_path, "segments").num_rows == 2 and read_table(tmp_path, "errors").num_rows == 1
    assert _done(writer) == {("a", ""), ("b", "")}  # no fingerprints given here
    assert _done(OutputWriter(tmp_path, config_hash="h2", model="m")) == set()  # another config: not done
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_actions_are_localised_from_the_stored_window_confidences(tmp_path):
    writer = OutputWriter(tmp_path, config_hash="h", model="m")
    windows = [(0, 2, {"run": 0.1}), (1, 3, {"run": 0.7}), (2, 4, {"run": 0.9, "jump": 0.2}), (3, 5, {"run": 0.6}),
               (4, 6, {"jump": 0.8}), (5, 7, {"jump": 0.3})]
    rows = [_segment("v", i, a, b, t) for i, (a, b, t) in enumerate(windows)] + [_end("v", len(windows))]
    writer.add(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))
    writer.flush()
    stored = read_table(tmp_path, "segments", "h").to_pylist()
    assert write_actions(tmp_path, localize_videos(stored, threshold=0.5), config_hash="h") == 2
    actions = sorted((a["label"], a["start_s"], a["end_s"], round(a["score"], 3))
                     for a in read_table(tmp_path, "actions").to_pylist())
    assert actions == [("jump", 4.0, 6.0, 0.8), ("run", 1.0, 5.0, 0.9)]


def test_localize_plans_windows_at_every_scale(archive, tiny_clip_dir, tmp_path):
    spec = parse_spec(f"input: {{paths: ['{archive}']}}\nmodel: {{pretrained: '{tiny_clip_dir}'}}\n"
                      f"output: {{dir: '{tmp_path}'}}\nsegments: {{localize: true, scales_s: [1.0, 2.0, 4.0]}}\n"
                      "sampling: {frames: 2}\n")
    rows = [r for r in decode_rows(str(archive / "clip0.mp4"), spec, 32) if r["kind"] == "segment"]
    spans = sorted((r["start_s"], r["end_s"]) for r in rows)
    assert len([s for s in spans if s[1] - s[0] == pytest.approx(1.0)]) == 9  # 5 s video, 1 s windows every 0.5 s
    assert [s for s in spans if s[1] - s[0] == pytest.approx(4.0)] == [(0.0, 4.0), (1.0, 5.0)]  # last flush with end
    with pytest.raises(Exception, match="segments.localize: needs segments.mode: window"):
        parse_spec(f"input: {{paths: ['{archive}']}}\noutput: {{dir: '{tmp_path}'}}\n"
                   "segments: {localize: true, mode: whole}\n")


def test_a_killed_runs_uncommitted_shards_are_never_read_and_are_removed(tmp_path):
    writer = OutputWriter(tmp_path, config_hash="h", model="m")
    writer.add(pa.Table.from_pylist([_segment("a", 0, 0, 2, {}), _end("a", 1)], schema=STREAM_SCHEMA))
    writer.flush()
    committed = next((tmp_path / "segments").glob("*.parquet")).name
    # a kill between the segments shard and its manifest shard leaves an orphan (and maybe a temporary file)
    orphan = tmp_path / "segments" / "part-0123456789ab.parquet"
    orphan.write_bytes((tmp_path / "segments" / committed).read_bytes())
    (tmp_path / "segments" / ".part-0123456789ab.parquet.tmp-4242").write_bytes(b"half")
    # and what reeltag never wrote: someone's notes, a folder, a file merely named like a shard
    theirs = ["notes.txt", "part-orphan.parquet", ".hidden"]
    for name in theirs:
        (tmp_path / "segments" / name).write_text("not ours\n")
    (tmp_path / "segments" / "drafts").mkdir()
    assert read_table(tmp_path, "segments").num_rows == 1
    OutputWriter(tmp_path, config_hash="h", model="m")  # the next run starts by removing ours
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == sorted([committed, "drafts", *theirs])
    assert read_table(tmp_path, "segments").num_rows == 1


def test_a_re_done_video_is_read_from_its_latest_commit_only(tmp_path):
    for fingerprint in ("1:1", "2:2"):  # the file changed between the runs
        writer = OutputWriter(tmp_path, config_hash="h", model="m", fingerprints={"/v/a.mp4": fingerprint})
        writer.add(pa.Table.from_pylist([_segment("a", 0, 0, 2, {}), _segment("a", 1, 2, 4, {}), _end("a", 2)],
                                        schema=STREAM_SCHEMA))
        writer.flush()
    assert read_table(tmp_path, "segments").num_rows == 2 and read_table(tmp_path, "manifest").num_rows == 2
    assert _done(writer) == {("a", "2:2")}  # its latest commit


def test_readers_can_take_the_latest_configs_rows_only(tmp_path):
    """A directory re-used with another config keeps both runs' rows; readers of results (report, search, the demo's
    scores) take the latest config's."""
    assert latest_config(tmp_path) is None
    for config in ("old", "new"):
        writer = OutputWriter(tmp_path, config_hash=config, model=f"m-{config}")
        writer.add(pa.Table.from_pylist([_segment("a", 0, 0, 2, {}), _end("a", 1)], schema=STREAM_SCHEMA))
        writer.flush()
    assert read_table(tmp_path, "segments").num_rows == 2
    assert latest_config(tmp_path) == ("new", "m-new")
    assert read_table(tmp_path, "segments", "new")["config_hash"].to_pylist() == ["new"]


def test_an_unreadable_shard_is_quarantined_and_its_videos_done_again(tmp_path, capsys):
    """A power cut after the rename leaves a zero-length manifest shard: readers skip it with a warning (was an
    ArrowInvalid traceback in run, report and search), and the next run moves it away so its video is redone."""
    writer = OutputWriter(tmp_path, config_hash="h", model="m")
    for vid in ("a", "b"):
        writer.add(pa.Table.from_pylist([_segment(vid, 0, 0, 2, {}), _end(vid, 1)], schema=STREAM_SCHEMA))
        writer.flush()
    shards = sorted((tmp_path / "manifest").glob("*.parquet"))
    lost = pq.read_table(shards[0])["video_id"][0].as_py()
    shards[0].write_bytes(b"")
    assert read_table(tmp_path, "segments").num_rows == 1 and "skipping unreadable shard" in capsys.readouterr().err
    again = OutputWriter(tmp_path, config_hash="h", model="m")
    assert {v for v, _ in _done(again)} == {"a", "b"} - {lost}
    assert (tmp_path / "quarantine" / "manifest" / shards[0].name).exists()
    assert not (tmp_path / "segments" / shards[0].name).exists()  # its rows left with it


def test_one_writer_per_output_directory_and_a_killed_holder_frees_it(tmp_path):
    import signal
    import subprocess
    import sys

    from pipeline.writer import OutputInUse, output_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.writer import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse, match=rf"in use by reeltag pid {holder.pid} on "):
            with output_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


def test_a_symlinked_table_directory_is_refused(tmp_path):
    from pipeline.writer import OutputError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.parquet").write_text("someone's\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "segments").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="is a symlink"):
        OutputWriter(out, config_hash="h", model="m")
    assert (elsewhere / "keep.parquet").read_text() == "someone's\n"


def test_transient_failures_are_retried_up_to_max_attempts_and_permanent_ones_only_when_asked(tmp_path):
    def run(**kwargs) -> set:
        writer = OutputWriter(tmp_path, config_hash="h", model="m")
        settled = writer.settled(max_attempts=3, **kwargs)
        todo = [vid for vid in ("hangs", "broken", "good") if (vid, "") not in settled]
        for vid, error in (("hangs", "timeout"), ("broken", "unreadable"), ("good", "")):
            if vid in todo:
                writer.add(pa.Table.from_pylist([_end(vid, 0, error) if error else _segment(vid, 0, 0, 2, {}),
                                                 *([] if error else [_end(vid, 1)])], schema=STREAM_SCHEMA))
        writer.flush()
        return set(todo)

    assert run() == {"hangs", "broken", "good"}
    assert run() == {"hangs"} and run() == {"hangs"}  # a timeout is tried again, up to 3 runs in all
    assert run() == set()
    attempts = {r["video_id"]: r["attempts"] for r in OutputWriter(tmp_path, config_hash="h", model="m")
                .commits().values()}
    assert attempts == {"hangs": 3, "broken": 1, "good": 1}
    assert run(retry_failed=True) == {"hangs", "broken"}  # reeltag run --retry-failed


def test_wait_takes_the_lock_once_its_holder_is_done(tmp_path):
    import subprocess
    import sys

    from pipeline.writer import output_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.writer import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(2)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    with output_lock(tmp_path, wait=True):
        assert holder.wait(timeout=1) == 0  # it had finished: the lock came when it let go


def test_a_long_video_is_committed_in_parts_and_a_killed_runs_parts_are_never_read(tmp_path):
    """The writer holds at most ``shard_rows`` of a video's rows: the rest are in parts its commit names. A run
    killed before the commit leaves parts no commit names: never read, removed by the next run."""
    long = [_segment("long", i, i, i + 1, {}) for i in range(10)]
    killed = OutputWriter(tmp_path, config_hash="h", model="m", shard_rows=4)
    killed.add(pa.Table.from_pylist(long[:9], schema=STREAM_SCHEMA))
    parts = sorted(p.name for p in (tmp_path / "segments").glob("part-*.parquet"))
    assert len(parts) == 2 and killed._videos["long"].buffered == 1  # 4 + 4 rows written, 1 held
    assert read_table(tmp_path, "segments").num_rows == 0 and read_table(tmp_path, "manifest").num_rows == 0

    writer = OutputWriter(tmp_path, config_hash="h", model="m", shard_rows=4)  # the next run
    assert not list((tmp_path / "segments").glob("part-*.parquet"))  # the dead parts are gone
    for first in range(0, 10, 3):  # rows arrive in batches, another video's among them
        writer.add(pa.Table.from_pylist(long[first:first + 3], schema=STREAM_SCHEMA))
    writer.add(pa.Table.from_pylist([_segment("short", 0, 0, 1, {}), _end("short", 1), _end("long", 10)],
                                    schema=STREAM_SCHEMA))
    writer.flush()
    segments = read_table(tmp_path, "segments")
    assert sorted(segments.filter(pa.compute.equal(segments["video_id"], "long"))["segment_id"].to_pylist()) \
        == list(range(10))
    commit = writer.commits()["long"]
    assert (commit["n_segments"], commit["status"], len(commit["parts"])) == (10, "ok", 2)
    assert not writer.commits()["short"]["parts"]

    OutputWriter(tmp_path, config_hash="h", model="m", shard_rows=4)  # a later run keeps the named parts
    assert read_table(tmp_path, "segments").num_rows == 11
    (tmp_path / "segments" / commit["parts"][0]).unlink()  # a part lost (damage, a hand): the commit is incomplete
    assert set(OutputWriter(tmp_path, config_hash="h", model="m").commits()) == {"short"}  # long is done again
    assert read_table(tmp_path, "segments")["video_id"].to_pylist() == ["short"]


def test_outputs_from_before_parts_read_as_commits_without_parts(tmp_path):
    writer = OutputWriter(tmp_path, config_hash="h", model="m")
    writer.add(pa.Table.from_pylist([_segment("a", 0, 0, 2, {}), _end("a", 1)], schema=STREAM_SCHEMA))
    writer.flush()
    shard = next((tmp_path / "manifest").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["parts", "attempts", "error_type"]), shard)
    assert read_table(tmp_path, "segments").num_rows == 1
    assert read_table(tmp_path, "manifest")["parts"].to_pylist() == [None]


def test_a_long_video_arriving_in_one_block_is_still_committed_in_parts(tmp_path):
    """Ray hands the driver whole blocks: a block may hold a long video's every row and its end row. Its shards
    stay at most shard_rows rows (pinned after a columnar rewrite committed such a video as one shard)."""
    writer = OutputWriter(tmp_path, config_hash="h", model="m", shard_rows=4)
    rows = [_segment("long", i, i, i + 1, {}) for i in range(10)] + [_end("long", 10)]
    assert writer.add(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)) == ["long"]
    writer.flush()
    commit = writer.commits()["long"]
    assert (commit["n_segments"], len(commit["parts"])) == (10, 2)
    sizes = sorted(pq.read_metadata(p).num_rows for p in (tmp_path / "segments").glob("part-*.parquet"))
    assert sizes == [2, 4, 4]
