"""Output tables: Parquet shards written to a temporary name and renamed, so a crash never leaves half a shard.

The driver receives a stream of rows (segment rows with embeddings and tags, one ``end`` row per video that
says how many segment rows the video has and whether it failed). A video is written only once all its rows
are in. A flush writes ``segments/part-X``, ``errors/part-X`` and then ``manifest/part-X``: the manifest shard
is the commit. Readers only see shards whose manifest shard exists (and, per video, only its latest commit),
so a run killed at any point and re-run gives exactly a clean run's rows: nothing duplicated, nothing missing.
The manifest records each video's fingerprint (size, modification time), so a changed file is done again.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from temporal.files import atomic_path

# score: softmax probability over the vocabulary; confidence: calibrated, comparable across labels and videos
TAG = pa.struct([("label", pa.string()), ("score", pa.float32()), ("confidence", pa.float32())])
REGION_TAG = pa.struct([("label", pa.string()), ("score", pa.float32()), ("confidence", pa.float32()),
                        ("box", pa.list_(pa.float32()))])  # box: normalised x0, y0, x1, y1 of the tile

VIDEO = [("video_id", pa.string()), ("uri", pa.string())]  # every table's first columns: which video
SPAN = [("start_s", pa.float64()), ("end_s", pa.float64())]  # seconds from the video's first frame
ERROR = [("stage", pa.string()),  # where it failed: decode, encode; empty when it did not
         ("error_type", pa.string()), ("message", pa.string())]

# What the encode stage hands to the writer, one row per segment plus one "end" row per video.
STREAM_SCHEMA = pa.schema([
    ("kind", pa.string()),  # "segment" or "end"
    *VIDEO,
    ("segment_id", pa.int32()),
    ("n_segments", pa.int32()),  # on "end" rows: segment rows this video produced
    *SPAN,
    ("frame_times_s", pa.list_(pa.float64())),
    ("embedding", pa.list_(pa.float32())),
    ("tags", pa.list_(TAG)),
    ("region_tags", pa.list_(REGION_TAG)),
    ("backend", pa.string()),
    ("node", pa.string()),  # on "end" rows: the Ray node that decoded the video
    ("encoder_node", pa.string()),  # the Ray node whose encoder actor handled the row
    *ERROR,
])

SEGMENTS_SCHEMA = pa.schema([
    *VIDEO,
    ("segment_id", pa.int32()),
    *SPAN,
    ("frame_times_s", pa.list_(pa.float64())),
    ("embedding", pa.list_(pa.float32())),  # L2-normalised, in the model's joint text-video space
    ("tags", pa.list_(TAG)),  # best first
    ("region_tags", pa.list_(REGION_TAG)),  # best label of each tile (tower levels >= 2), empty otherwise
    ("backend", pa.string()),  # decoder that served the video
    ("model", pa.string()),
    ("config_hash", pa.string()),
])

ACTIONS_SCHEMA = pa.schema([
    *VIDEO,
    ("label", pa.string()),
    *SPAN,  # the action's extent, merged from the windows that found it
    ("score", pa.float32()),  # the best window's calibrated confidence
    ("config_hash", pa.string()),
])

ERRORS_SCHEMA = pa.schema([*VIDEO, *ERROR, ("config_hash", pa.string())])

MANIFEST_SCHEMA = pa.schema([
    *VIDEO,
    ("fingerprint", pa.string()),  # size:mtime_ns of the file when it was read
    ("config_hash", pa.string()),
    ("model", pa.string()),
    ("status", pa.string()),  # ok, failed (no segments), partial (segments and an error)
    ("n_segments", pa.int32()),
    ("node", pa.string()),  # Ray node that decoded it
    ("committed_at", pa.float64()),  # unix time of the commit; the latest commit of a video wins
])


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet, through :func:`temporal.files.atomic_path`."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def latest_config(out_dir: str | Path) -> tuple[str, str] | None:
    """(config hash, model) of the most recent commit under ``out_dir``; None if nothing was committed. An output
    directory can hold runs of several configs: readers show the latest one's."""
    manifest = read_table(out_dir, "manifest")
    if manifest.num_rows == 0:
        return None
    at = manifest["committed_at"].to_pylist()
    latest = at.index(max(at))
    return manifest["config_hash"][latest].as_py(), manifest["model"][latest].as_py()


def read_table(out_dir: str | Path, name: str, config_hash: str | None = None) -> pa.Table:
    """All committed rows of ``segments``, ``errors``, ``manifest`` or ``actions`` under ``out_dir`` as one table
    (empty, with the schema, if none), of every config or only of ``config_hash``. A video's rows come from its
    latest commit only."""
    table = _read_table(Path(out_dir), name)
    return table if config_hash is None else table.filter(pc.equal(table["config_hash"], config_hash))


def _read_table(out_dir: Path, name: str) -> pa.Table:
    schema = {"segments": SEGMENTS_SCHEMA, "errors": ERRORS_SCHEMA, "actions": ACTIONS_SCHEMA,
              "manifest": MANIFEST_SCHEMA}[name]
    if name == "actions":
        files = sorted((out_dir / name).glob("*.parquet"))
        return pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else schema.empty_table()
    manifest = {f.name: pq.read_table(f, schema=MANIFEST_SCHEMA)
                for f in sorted((out_dir / "manifest").glob("*.parquet"))}
    if name == "manifest":
        return pa.concat_tables(manifest.values()) if manifest else schema.empty_table()
    latest: dict[tuple, tuple[float, str]] = {}
    for shard, table in manifest.items():
        for vid, config, at in zip(*(table[c].to_pylist() for c in ("video_id", "config_hash", "committed_at"))):
            if (vid, config) not in latest or at >= latest[(vid, config)][0]:
                latest[(vid, config)] = (at, shard)
    tables = []
    for shard in manifest:
        path = out_dir / name / shard
        if path.exists():
            table = pq.read_table(path, schema=schema)
            keep = [latest[(v, c)][1] == shard for v, c in zip(table["video_id"].to_pylist(),
                                                               table["config_hash"].to_pylist())]
            tables.append(table.filter(pa.array(keep, pa.bool_())))
    return pa.concat_tables(tables) if tables else schema.empty_table()


class OutputWriter:
    """Buffers stream rows per video; commits finished videos as ``segments``/``errors``/``manifest`` shards."""

    def __init__(self, out_dir: str | Path, *, config_hash: str, model: str, shard_rows: int = 4096,
                 fingerprints: dict[str, str] | None = None):
        self.out_dir, self.config_hash, self.model, self.shard_rows = Path(out_dir), config_hash, model, shard_rows
        self.fingerprints = fingerprints or {}  # uri -> size:mtime_ns
        for name in ("segments", "errors", "manifest"):
            (self.out_dir / name).mkdir(parents=True, exist_ok=True)
        self._remove_uncommitted()
        self._rows: dict[str, list[dict]] = defaultdict(list)  # video_id -> its rows so far
        self._ends: dict[str, dict] = {}  # video_id -> its end row, once it has arrived
        self._ready: list[dict] = []  # rows of finished videos not yet in a shard
        self._ready_segments = 0  # segment rows among them
        self.videos_ok = self.videos_failed = self.segments = 0
        self.errors_by_type: dict[str, int] = defaultdict(int)
        self.videos_by_node: dict[str, int] = defaultdict(int)  # decode
        self.segments_by_encoder_node: dict[str, int] = defaultdict(int)

    def _remove_uncommitted(self) -> None:
        """Shards (and temporary files) a killed run left without their manifest shard: never read, now gone."""
        committed = {f.name for f in (self.out_dir / "manifest").glob("*.parquet")}
        for name in ("segments", "errors", "manifest"):
            for f in (self.out_dir / name).iterdir():
                if f.name.startswith(".") or (name != "manifest" and f.name not in committed):
                    f.unlink()

    def finished(self) -> set[tuple[str, str]]:
        """(video id, fingerprint) pairs committed for this config."""
        t = read_table(self.out_dir, "manifest")
        t = t.filter(pc.equal(t["config_hash"], self.config_hash))
        return set(zip(t["video_id"].to_pylist(), t["fingerprint"].to_pylist()))

    def add(self, table: pa.Table) -> list[str]:
        """Take a batch of stream rows; return the ids of the videos it completed."""
        completed = []
        for row in table.to_pylist():
            vid = row["video_id"]
            self._rows[vid].append(row)
            if row["kind"] == "end":
                self._ends[vid] = row
            if vid in self._ends and len(self._rows[vid]) == self._ends[vid]["n_segments"] + 1:
                rows, end = self._rows.pop(vid), self._ends.pop(vid)
                self._ready.extend(rows)
                self._ready_segments += end["n_segments"]
                self._count(rows, end)
                completed.append(vid)
        if self._ready_segments >= self.shard_rows:
            self.flush()
        return completed

    def _count(self, rows: list[dict], end: dict) -> None:
        failures = [r for r in rows if r["error_type"]]
        self.segments += sum(r["kind"] == "segment" and not r["error_type"] for r in rows)
        if failures:
            self.videos_failed += 1
            for r in failures:
                self.errors_by_type[r["error_type"]] += 1
        else:
            self.videos_ok += 1
        self.videos_by_node[end.get("node") or "local"] += 1
        for r in rows:
            if r["kind"] == "segment":
                self.segments_by_encoder_node[r.get("encoder_node") or "local"] += 1

    def flush(self) -> None:
        """Commit the finished videos: segments and errors shards, then the manifest shard."""
        if not self._ready:
            return
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        good = [r for r in self._ready if r["kind"] == "segment" and not r["error_type"]]
        bad = [r for r in self._ready if r["error_type"]]
        common = {"model": self.model, "config_hash": self.config_hash}
        if bad:
            write_atomic(pa.Table.from_pylist([{**r, **common} for r in bad], schema=ERRORS_SCHEMA),
                         self.out_dir / "errors" / name)
        if good:
            write_atomic(pa.Table.from_pylist([{**r, **common} for r in good], schema=SEGMENTS_SCHEMA),
                         self.out_dir / "segments" / name)
        now, manifest = time.time(), []
        segments_of = Counter(r["video_id"] for r in good)
        failed_ids = {r["video_id"] for r in bad}
        for end in (r for r in self._ready if r["kind"] == "end"):
            n, failed = segments_of[end["video_id"]], end["video_id"] in failed_ids
            manifest.append({"video_id": end["video_id"], "uri": end["uri"],
                             "fingerprint": self.fingerprints.get(end["uri"], ""), **common, "n_segments": n,
                             "status": ("partial" if n else "failed") if failed else "ok",
                             "node": end.get("node") or "", "committed_at": now})
        write_atomic(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), self.out_dir / "manifest" / name)
        self._ready, self._ready_segments = [], 0

    def unfinished(self) -> list[str]:
        """Videos with rows but no complete set (only after a failure upstream)."""
        return list(self._rows)


def write_actions(out_dir: str | Path, actions: list[dict], *, config_hash: str) -> int:
    """Replace ``actions/actions.parquet`` with ``actions`` (rows of :func:`temporal.localize.localize_videos`)."""
    directory = Path(out_dir) / "actions"
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{**a, "config_hash": config_hash} for a in actions]
    write_atomic(pa.Table.from_pylist(rows, schema=ACTIONS_SCHEMA), directory / "actions.parquet")
    return len(rows)
