"""The search index against what the output's commits say: exact and ANN agree, updates follow commits (added,
replaced, killed midway), filters, query by example and by image, the JSON shape. Real Parquet, real FAISS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest

import jobs.search as search_module
from jobs.run import save_config
from jobs.search import Filters, SearchError, build_index, nearest, search
from pipeline.config import parse_spec
from pipeline.stages import run_sequential
from pipeline.writer import STREAM_SCHEMA, OutputWriter, read_table

DIM = 64
REPO = Path(__file__).resolve().parents[2]
REELTAG = [sys.executable, "-m", "jobs.cli"]


def _vectors(n: int, seed: int) -> np.ndarray:
    """Clustered unit vectors with a shared mean direction, like CLIP embeddings."""
    rng = np.random.default_rng(seed)
    mean = np.random.default_rng(0).standard_normal(DIM)
    centres = np.random.default_rng(1).standard_normal((40, DIM))
    x = mean + centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _commit(out: Path, videos: dict[str, np.ndarray], *, labels=("run", "jump", "sit")) -> None:
    """Commit each video's segments (2 s windows, tags by segment number) through the writer, as a run does."""
    writer = OutputWriter(out, config_hash="h", model="clip:m", shard_rows=512)
    for vid, emb in videos.items():
        rows = [{"kind": "segment", "video_id": vid, "uri": f"/archive/{vid}.mp4", "segment_id": i,
                 "start_s": 2.0 * i, "end_s": 2.0 * i + 2.0, "frame_times_s": [2.0 * i], "embedding": e,
                 "tags": [{"label": labels[i % 3], "score": 0.5, "confidence": (i % 10) / 10}],
                 "region_tags": [{"label": labels[(i // 2) % 3], "score": 0.5, "confidence": (i % 7) / 7,
                                  "box": [0.0, 0.0, 0.5, 0.5]}] if i % 4 else [],
                 "backend": "pyav", "stage": "", "error_type": "", "message": ""}
                for i, e in enumerate(emb)]
        rows.append({"kind": "end", "video_id": vid, "uri": f"/archive/{vid}.mp4", "n_segments": len(emb),
                     "stage": "", "error_type": "", "message": ""})
        writer.add(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))
    writer.flush()


def _brute(out: Path, query: np.ndarray, top: int, keep=lambda r: True) -> list[tuple[str, int]]:
    rows = [r for r in read_table(out, "segments", "h").to_pylist() if keep(r)]
    scores = np.array([np.dot(r["embedding"], query) for r in rows])
    return [(rows[i]["video_id"], rows[i]["segment_id"]) for i in np.argsort(-scores, kind="stable")[:top]]


def _found(index, query, top, filters=search_module.NO_FILTERS) -> list[tuple[str, int]]:
    ids, _ = nearest(index, query, top, filters)
    video, segment = index.column("video"), index.column("segment_id")
    return [(index.videos["video_id"][int(video[i])].as_py(), int(segment[i])) for i in ids]


@pytest.fixture
def archive_out(tmp_path) -> Path:
    out = tmp_path / "out"
    _commit(out, {f"v{i:02d}": _vectors(100, seed=10 + i) for i in range(30)})  # 3,000 segments
    return out


def test_exact_scan_equals_brute_force_and_ann_agrees(archive_out, monkeypatch):
    queries = _vectors(20, seed=99)
    index = build_index(archive_out)
    assert index.ann is None and index.rows == 3000  # below ANN_MIN_ROWS: exact
    for q in queries:
        assert _found(index, q, 10) == _brute(archive_out, q, 10)
    monkeypatch.setattr(search_module, "ANN_MIN_ROWS", 1000)
    (archive_out / "index" / "h" / "meta.json").unlink()  # rebuilt, now with the IVF-PQ index
    index = build_index(archive_out)
    assert index.ann is not None
    recall = np.mean([len(set(_found(index, q, 10)) & set(_brute(archive_out, q, 10))) / 10 for q in queries])
    assert recall >= 0.95, recall
    ids, scores = nearest(index, queries[0], 10)
    np.testing.assert_allclose(scores, index.embedding(ids) @ queries[0], rtol=1e-6)  # re-ranked exactly


@pytest.mark.parametrize("ann", [False, True])
def test_the_index_follows_the_commits_added_replaced_and_an_update_killed_midway(tmp_path, monkeypatch, ann):
    if ann:
        monkeypatch.setattr(search_module, "ANN_MIN_ROWS", 500)
    out = tmp_path / "out"
    _commit(out, {f"v{i}": _vectors(100, seed=i) for i in range(10)})
    first = build_index(out)
    assert first.rows == 1000 and (first.ann is not None) == ann
    new = _vectors(100, seed=500)
    _commit(out, {"added": new, "v3": _vectors(100, seed=600)})  # a new video; v3 done again with new rows
    index = build_index(out)
    assert index.rows == 1100 and len(index.meta["chunks"]) == 2  # the change only, as a new chunk
    assert index.meta["trained_rows"] == (1000 if ann else 0)  # not retrained for +10%
    for q in new[:5]:  # the new segments are findable at once
        assert _found(index, q, 1)[0][0] == "added"
    committed = {(r["video_id"], r["segment_id"]): np.array(r["embedding"])
                 for r in read_table(out, "segments", "h").to_pylist()}
    for q in _vectors(100, seed=3)[:20]:  # queries near v3's old rows: those rows are never returned
        ids, _ = nearest(index, q, 50)
        assert not index.deleted[ids].any()
        for key, e in zip(_found(index, q, 50), index.embedding(ids)):
            np.testing.assert_array_equal(e, committed[key])  # what the latest commit holds
        if not ann:
            assert _found(index, q, 50) == _brute(out, q, 50)
    _commit(out, {"later": _vectors(100, seed=700)})  # an update killed before its meta.json: the last index stays

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "_update_ann", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(out)
    survivor = search_module.open_index(out / "index" / "h")
    assert survivor.rows == 1100 and "later" not in survivor.videos["video_id"].to_pylist()
    monkeypatch.undo()
    if ann:
        monkeypatch.setattr(search_module, "ANN_MIN_ROWS", 500)
    index = build_index(out)
    assert index.rows == 1200 and _found(index, _vectors(100, seed=700)[0], 1)[0][0] == "later"
    named = {index.meta["ann"], index.meta["deleted"], index.meta["videos"], index.meta["commits"], "meta.json",
             ".reeltag.lock", *(f"{c}.{e}" for c in index.meta["chunks"] for e in search_module.CHUNK_FILES)}
    assert {p.name for p in (out / "index" / "h").iterdir()} == named - {None}  # the killed update's files: gone


def _ids_of(index, vid: str) -> np.ndarray:
    v = index.videos["video_id"].to_pylist().index(vid)
    return np.flatnonzero((index.column("video") == v) & ~index.deleted)


def test_uncommitted_rows_are_never_indexed(tmp_path):
    out = tmp_path / "out"
    _commit(out, {"done": _vectors(10, seed=1)})
    writer = OutputWriter(out, config_hash="h", model="clip:m", shard_rows=4)  # a run killed mid-video
    rows = [{"kind": "segment", "video_id": "killed", "uri": "/archive/killed.mp4", "segment_id": i, "start_s": 0.0,
             "end_s": 1.0, "embedding": e, "tags": [], "region_tags": [], "stage": "", "error_type": "", "message": ""}
            for i, e in enumerate(_vectors(9, seed=2))]
    writer.add(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))  # two parts on disk, no commit
    index = build_index(out)
    assert index.rows == 10 and index.videos["video_id"].to_pylist() == ["done"]


@pytest.mark.parametrize("ann", [False, True])
def test_filters_keep_only_what_they_name_and_rank_as_brute_force_would(archive_out, monkeypatch, ann):
    if ann:
        monkeypatch.setattr(search_module, "ANN_MIN_ROWS", 1000)
    index = build_index(archive_out)
    q = _vectors(1, seed=77)[0]
    cases = [(Filters(video="v07"), lambda r: r["video_id"] == "v07"),
             (Filters(video="/archive/v07.mp4"), lambda r: r["video_id"] == "v07"),
             (Filters(tag="jump", min_confidence=0.5),
              lambda r: any(t["label"] == "jump" and t["confidence"] >= 0.5 for t in r["tags"])),
             (Filters(region="jump", min_confidence=0.4),  # the region tags' own postings, not the tags'
              lambda r: any(t["label"] == "jump" and t["confidence"] >= 0.4 for t in r["region_tags"])),
             (Filters(region="sit", tag="jump"), lambda r: any(t["label"] == "sit" for t in r["region_tags"]) and
              any(t["label"] == "jump" for t in r["tags"])),
             (Filters(after=100.0, before=150.0), lambda r: r["start_s"] >= 100.0 and r["end_s"] <= 150.0),
             (Filters(after=20.0), lambda r: r["start_s"] >= 20.0)]  # most rows: through the ANN's selector
    for filters, keep in cases:
        found, truth = _found(index, q, 10, filters), _brute(archive_out, q, 10, keep)
        rows = {(r["video_id"], r["segment_id"]): r for r in read_table(archive_out, "segments", "h").to_pylist()}
        assert truth and all(keep(rows[k]) for k in found), filters
        assert found == truth if not ann else len(set(found) & set(truth)) >= 9, filters
    with pytest.raises(SearchError, match="--tag: no segment is tagged 'fly'"):
        nearest(index, q, 10, Filters(tag="fly"))
    with pytest.raises(SearchError, match=r"--region: no segment has a region tagged 'fly' \(labels: run, jump, sit\)"):
        nearest(index, q, 10, Filters(region="fly"))
    with pytest.raises(SearchError, match="--video: no committed video 'nope'"):
        nearest(index, q, 10, Filters(video="nope"))


def test_like_a_segment_and_the_json_shape(archive_out):
    first = build_index(archive_out)
    target = first.embedding(_ids_of(first, "v05")[:1])[0]
    found = search(archive_out, like_segment="v05:0", top_k=5)
    assert set(found) == {"query", "took_ms", "results"} and found["query"] == {"like": "v05:0", "top_k": 5}
    assert all(set(r) == {"video_id", "uri", "segment_id", "start_s", "end_s", "score"} for r in found["results"])
    assert ("v05", 0) not in {(r["video_id"], r["segment_id"]) for r in found["results"]}  # not itself
    expected = [k for k in _brute(archive_out, target, 6) if k != ("v05", 0)][:5]
    # moments: a result's neighbouring windows of the same video do not overlap (2 s windows, no stride)
    assert [(r["video_id"], r["segment_id"]) for r in found["results"]] == expected
    cli = subprocess.run([*REELTAG, "search", str(archive_out), "--like", "v05:0", "--top-k", "5", "--json",
                          "--after", "0"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["query"] == {"like": "v05:0", "top_k": 5, "after": 0.0} and printed["took_ms"] < 1000
    for bad, message in ((["--like", "v05"], "expected VIDEO_ID:SEGMENT_ID"),
                         (["--like", "v05:9999"], "video v05 has no committed segment 9999"),
                         (["some text", "--like", "v05:1"], "give exactly one query"),
                         (["--like", "v05:1", "--top-k", "0"], "--top-k: must be > 0")):
        cli = subprocess.run([*REELTAG, "search", str(archive_out), *bad], capture_output=True, text=True,
                             timeout=120)
        assert cli.returncode == 2 and message in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1 or "usage:" in cli.stderr


def test_text_and_image_queries_embed_with_the_runs_model(archive, tmp_path):
    """Real videos (three shapes in three colours) decoded and encoded by the committed demo model, then queried by
    a caption and by a still taken from one video with PyAV and saved by PIL: the still's own video comes first."""
    from PIL import Image

    out = tmp_path / "out"
    model = REPO / "models" / "synthactions"
    spec = parse_spec(f"input: {{paths: ['{archive}']}}\nmodel: {{pretrained: '{model}', local_files_only: true, "
                      f"dtype: float32}}\noutput: {{dir: '{out}'}}\nsampling: {{frames: 3}}\n"
                      "segments: {mode: whole}\n")
    out.mkdir()
    save_config(out, spec, "h")
    writer = OutputWriter(out, config_hash="h", model=spec.model_id())
    writer.add(run_sequential(spec, [str(archive / f"clip{i}.mp4") for i in range(3)]))
    writer.flush()
    found = search(out, "a blue square growing", top_k=3)
    assert found["query"] == {"text": "a blue square growing", "top_k": 3} and len(found["results"]) == 3
    assert found["results"][0]["uri"] == str(archive / "clip1.mp4"), found
    for i in range(3):
        with av.open(str(archive / f"clip{i}.mp4")) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
        Image.fromarray(frame).save(tmp_path / "still.png")
        by_image = search(out, image=tmp_path / "still.png", top_k=3)
        assert by_image["results"][0]["uri"] == str(archive / f"clip{i}.mp4"), by_image
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(SearchError, match="--image .*not.png: not an image"):
        search(out, image=tmp_path / "not.png")


def test_the_coarse_quantiser_is_trained_again_when_the_data_has_doubled(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "ANN_MIN_ROWS", 500)
    out = tmp_path / "out"
    _commit(out, {f"a{i}": _vectors(100, seed=i) for i in range(6)})
    assert build_index(out).meta["trained_rows"] == 600
    _commit(out, {f"b{i}": _vectors(100, seed=50 + i) for i in range(5)})  # 1,100 rows: less than double
    assert build_index(out).meta["trained_rows"] == 600
    _commit(out, {f"c{i}": _vectors(100, seed=80 + i) for i in range(2)})  # 1,300 > 2 x 600: trained again
    index = build_index(out)
    assert index.meta["trained_rows"] == 1300 and index.ann.ntotal == 1300
    q = _vectors(1, seed=81)[0]
    assert len(set(_found(index, q, 10)) & set(_brute(out, q, 10))) >= 9


def test_an_unchanged_output_is_not_read_again_to_check_the_index(archive_out, monkeypatch):
    build_index(archive_out)
    calls = []
    monkeypatch.setattr(search_module, "commit_keys", lambda *a: calls.append(a) or {})
    assert build_index(archive_out).rows == 3000 and calls == []  # the shard listing is the same: no manifest read
    monkeypatch.undo()
    _commit(archive_out, {"new": _vectors(10, seed=5)})
    assert build_index(archive_out).rows == 3010  # a new commit changes the listing


def test_an_output_whose_videos_all_failed_has_no_segments_to_search(tmp_path):
    writer = OutputWriter(tmp_path, config_hash="h", model="clip:m")
    writer.add(pa.Table.from_pylist([{"kind": "end", "video_id": "bad", "uri": "/a/bad.mp4", "n_segments": 0,
                                      "stage": "decode", "error_type": "unreadable", "message": "not a video"}],
                                    schema=STREAM_SCHEMA))
    writer.flush()
    for _ in range(2):  # building the empty index, then opening it
        with pytest.raises(SearchError, match="no segments for config h"):
            build_index(tmp_path)
