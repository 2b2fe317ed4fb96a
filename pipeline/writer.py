"""Output tables: Parquet shards written to a temporary name and renamed, so a crash never leaves half a shard.

The driver receives a stream of rows (segment rows with embeddings and tags, one ``end`` row per video that
says how many segment rows the video has and whether it failed). A video is committed only once all its rows
are in. A flush writes ``segments/part-X``, ``errors/part-X`` and then ``manifest/part-X``: the manifest shard
is the commit. A long video is not held whole: each ``shard_rows`` of its rows go to a shard of their own (a
*part*, with no manifest shard), and its commit names its parts. Readers only see a video's latest commit whose
parts are all there, so a run killed at any point and re-run gives exactly a clean run's rows: nothing
duplicated, nothing missing; the next run removes the parts no commit names. The manifest records each video's
fingerprint (size, modification time), so a changed file is done again.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import time
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
    # L2-normalised, in the model's joint text-video space; written as a fixed-size list (segments_schema)
    ("embedding", pa.list_(pa.float32())),
    ("tags", pa.list_(TAG)),  # best first
    ("region_tags", pa.list_(REGION_TAG)),  # best label of each tile (tower levels >= 2), empty otherwise
    ("backend", pa.string()),  # decoder that served the video
    ("model", pa.string()),
    ("config_hash", pa.string()),
])

def segments_schema(dim: int) -> pa.Schema:
    """``segments`` as written: the embedding a fixed-size list of ``dim`` (vector tools read it as a vector)."""
    return SEGMENTS_SCHEMA.set(SEGMENTS_SCHEMA.get_field_index("embedding"),
                               pa.field("embedding", pa.list_(pa.float32(), dim)))


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
    ("error_type", pa.string()),  # the video's first failure ("" when none; null in outputs from before)
    ("attempts", pa.int32()),  # runs that have tried it under this config and fingerprint (null: 1)
    ("parts", pa.list_(pa.string())),  # shards holding the video's earlier rows (long videos; null: none)
])

# Failures worth another run: the decoder hung or died, or a remote read broke. Any other (unreadable, no video
# stream, too_long, ...) is the file's own and final, unless `reeltag run --retry-failed`.
TRANSIENT_ERRORS = frozenset({"timeout", "decoder_crashed", "io_error"})


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet, through :func:`temporal.files.atomic_path`."""
    vectors = [n for n in table.schema.names if n == "embedding"]  # floats: dictionaries and snappy gain nothing
    with atomic_path(path) as tmp:  # and cost 3x the write time (measured: benchmarks/driver_commit.py)
        pq.write_table(table, tmp, use_dictionary=[n for n in table.schema.names if n not in vectors],
                       compression={n: "none" if n in vectors else "snappy" for n in table.schema.names})


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


SCHEMAS = {"segments": SEGMENTS_SCHEMA, "errors": ERRORS_SCHEMA, "actions": ACTIONS_SCHEMA,
           "manifest": MANIFEST_SCHEMA}
SHARD_NAME = re.compile(r"part-[0-9a-f]{12}\.parquet")  # the only names reeltag writes (and removes) in a table
TEMP_NAME = re.compile(r"\.part-[0-9a-f]{12}\.parquet\.tmp-\d+")  # a shard being written (temporal.files)


def _shards(directory: Path) -> list[Path]:
    """reeltag's shards in ``directory``, by name; anything else there (someone's file, a subdirectory) is not."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if SHARD_NAME.fullmatch(p.name) and p.is_file()
                  and not p.is_symlink())


def _read_shard(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table | None:
    """The shard, or None with a one-line warning when it cannot be read (empty after a power cut, damaged). The
    embedding column keeps the width it was written with (a fixed-size list; variable in outputs from before)."""
    try:
        if "embedding" in schema.names:
            stored = pq.read_schema(path)
            if "embedding" in stored.names:
                at = schema.get_field_index("embedding")
                schema = schema.set(at, pa.field("embedding", stored.field("embedding").type))
        if columns is not None:  # the key columns, for choosing the committed rows, and those asked for
            keep = [n for n in schema.names if n in {"video_id", "config_hash", *columns}]
            schema = pa.schema([schema.field(n) for n in keep])
        return pq.read_table(path, schema=schema, columns=schema.names)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        print(f"reeltag: warning: skipping unreadable shard {path}: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def _readable(path: Path) -> bool:
    """Whether the shard's Parquet footer reads (it does not, when a power cut left it empty or short)."""
    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError):
        return False


def _read_table(out_dir: Path, name: str) -> pa.Table:
    schema = SCHEMAS[name]
    if name == "actions":
        files = [f for f in sorted((out_dir / name).glob("*.parquet")) if f.is_file()]
        tables = [t for t in (_read_shard(f, schema) for f in files) if t is not None]
        return pa.concat_tables(tables) if tables else schema.empty_table()
    if name == "manifest":
        manifest = _manifest_shards(out_dir)
        return _complete(out_dir, pa.concat_tables(manifest.values())) if manifest else schema.empty_table()
    tables = [table for _, table in committed_rows(out_dir, name)]
    if not tables:
        return schema.empty_table()
    if len({t.schema.field("embedding").type for t in tables if "embedding" in t.schema.names}) > 1:
        tables = [t.cast(SEGMENTS_SCHEMA) for t in tables]  # configs of several widths: variable-size lists
    return pa.concat_tables(tables)


def _manifest_shards(out_dir: Path) -> dict[str, pa.Table]:
    return {f.name: t for f in _shards(out_dir / "manifest") if (t := _read_shard(f, MANIFEST_SCHEMA)) is not None}


def commit_keys(out_dir: str | Path, config_hash: str) -> dict[str, str]:
    """Video id -> the name of the manifest shard of its latest complete commit for ``config_hash``: what a reader
    sees of it changes exactly when this does (the search index keeps itself consistent with it)."""
    return {vid: commit for (vid, config), (_, commit, _) in _latest(Path(out_dir), _manifest_shards(Path(out_dir)))
            .items() if config == config_hash}


def committed_rows(out_dir: str | Path, name: str, config_hash: str | None = None, *,
                   videos: set[str] | None = None, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """The committed rows of ``segments`` or ``errors``, one shard at a time (never the whole table in memory):
    ``(shard name, its rows that readers take)``, of every config or only ``config_hash``, of every video or only
    ``videos`` (then only the shards holding their commits are read); ``columns``: those and ``video_id``,
    ``config_hash`` only."""
    out_dir = Path(out_dir)
    chosen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for (vid, config), (_, commit, parts) in _latest(out_dir, _manifest_shards(out_dir)).items():
        if (config_hash is None or config == config_hash) and (videos is None or vid in videos):
            for shard in (commit, *parts):
                chosen[shard].add((vid, config))
    for shard in sorted(chosen):
        path = out_dir / name / shard
        table = _read_shard(path, SCHEMAS[name], columns) if path.is_file() else None
        if table is not None:
            keep = chosen[shard]
            mask = [(v, c) in keep for v, c in zip(table["video_id"].to_pylist(), table["config_hash"].to_pylist())]
            table = table.filter(pa.array(mask, pa.bool_()))
            yield shard, table


def _latest(out_dir: Path, manifest: dict[str, pa.Table]) -> dict[tuple[str, str], tuple[float, str, list[str]]]:
    """(video id, config) -> (commit time, manifest shard, parts) of each video's latest commit whose parts are all
    there (a part lost to damage makes the commit incomplete: an earlier one counts, and the next run does the
    video again)."""
    present = _present(out_dir)
    latest: dict[tuple, tuple[float, str, list[str]]] = {}
    for shard, table in manifest.items():
        for vid, config, at, parts in zip(*(table[c].to_pylist()
                                            for c in ("video_id", "config_hash", "committed_at", "parts"))):
            parts = parts or []
            if all(p in present for p in parts) and ((vid, config) not in latest or at >= latest[(vid, config)][0]):
                latest[(vid, config)] = (at, shard, parts)
    return latest


def _present(out_dir: Path) -> set[str]:
    return {p.name for name in ("segments", "errors") for p in _shards(out_dir / name)}


def _complete(out_dir: Path, manifest: pa.Table) -> pa.Table:
    """The manifest rows whose parts are all there."""
    present = _present(out_dir)
    mask = [all(p in present for p in parts or []) for parts in manifest["parts"].to_pylist()]
    return manifest.filter(pa.array(mask, pa.bool_()))


class OutputError(RuntimeError):
    """An output directory reeltag cannot write safely (in use by another run, a symlinked table directory)."""


class OutputInUse(OutputError):
    """Another reeltag run holds the output directory's lock."""


LOCK_FILE = ".reeltag.lock"


@contextmanager
def output_lock(out_dir: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold ``output.dir``'s lock: one writer at a time. An exclusive ``flock`` on ``output.dir/.reeltag.lock``,
    which the kernel drops when its holder exits, however (a SIGKILLed run's lock is free again at once). Without
    ``wait``, a held lock is :class:`OutputInUse` naming its holder."""
    out_dir = Path(out_dir)
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
            raise OutputInUse(f"output.dir {out_dir} is in use by {holder}: let it finish, or pass --wait to wait "
                              "for it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"reeltag pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield out_dir
    finally:
        os.close(fd)


class OutputWriter:
    """Buffers stream rows per video; commits finished videos as ``segments``/``errors``/``manifest`` shards."""

    def __init__(self, out_dir: str | Path, *, config_hash: str, model: str, shard_rows: int = 4096,
                 fingerprints: dict[str, str] | None = None):
        self.out_dir, self.config_hash, self.model, self.shard_rows = Path(out_dir), config_hash, model, shard_rows
        self.fingerprints = fingerprints or {}  # uri -> size:mtime_ns
        self.attempts: dict[str, int] = {}  # video id -> attempts before this run (videos it retries)
        for name in ("segments", "errors", "manifest"):
            if (self.out_dir / name).is_symlink():  # never followed out of output.dir
                raise OutputError(f"{self.out_dir / name} is a symlink: reeltag writes only inside output.dir")
            (self.out_dir / name).mkdir(parents=True, exist_ok=True)
        self._remove_uncommitted()
        self._videos: dict[str, _Video] = defaultdict(_Video)  # videos with rows in flight
        self._ready: list[_Video] = []  # finished videos not yet committed
        self._ready_rows = 0  # their rows not yet in a shard
        self.videos_ok = self.videos_failed = self.segments = 0
        self.errors_by_type: dict[str, int] = defaultdict(int)
        self.videos_by_node: dict[str, int] = defaultdict(int)  # decode
        self.segments_by_encoder_node: dict[str, int] = defaultdict(int)

    def _remove_uncommitted(self) -> None:
        """Put away what a killed run or a power cut left: its temporary files and the shards no commit names
        (never read: a flush cut short, the parts of a video never committed) are removed; an unreadable shard is
        moved to ``quarantine/`` with its manifest shard, so its videos are done again. Only files with reeltag's
        own shard names are touched."""
        for name in ("segments", "errors", "manifest"):
            for f in (self.out_dir / name).iterdir():
                if TEMP_NAME.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                    f.unlink()
        for name in ("manifest", "segments", "errors"):
            for f in _shards(self.out_dir / name):
                if not _readable(f):
                    self._quarantine(f.name)
        committed = set()  # manifest shards, and the parts their commits name
        for f in _shards(self.out_dir / "manifest"):
            committed.add(f.name)
            if (table := _read_shard(f, MANIFEST_SCHEMA)) is not None:
                committed.update(p for parts in table["parts"].to_pylist() for p in parts or [])
        for name in ("segments", "errors"):
            for f in _shards(self.out_dir / name):
                if f.name not in committed:
                    f.unlink()

    def _quarantine(self, shard: str) -> None:
        for name in ("manifest", "segments", "errors"):
            path = self.out_dir / name / shard
            if path.is_file():
                (self.out_dir / "quarantine" / name).mkdir(parents=True, exist_ok=True)
                os.replace(path, self.out_dir / "quarantine" / name / shard)
        print(f"reeltag: warning: shard {shard} could not be read; moved to {self.out_dir / 'quarantine'}, its "
              "videos are done again", file=sys.stderr)

    def commits(self) -> dict[str, dict]:
        """Each video's latest commit for this config: its manifest row."""
        t = read_table(self.out_dir, "manifest", self.config_hash)
        latest: dict[str, dict] = {}
        for row in t.to_pylist():
            if row["video_id"] not in latest or row["committed_at"] >= latest[row["video_id"]]["committed_at"]:
                latest[row["video_id"]] = row
        return latest

    def settled(self, *, max_attempts: int, retry_failed: bool = False) -> set[tuple[str, str]]:
        """(video id, fingerprint) pairs a run need not do again: committed, unless their failure was transient
        and tried fewer than ``max_attempts`` times, or they failed at all and ``retry_failed``. Counts the
        attempts of those it will retry, for their next commit."""
        done = set()
        for vid, c in self.commits().items():
            # outputs from before the manifest named failures: a failed video's failure is unknown (not transient)
            failure = c["error_type"] or ("" if c["status"] == "ok" else "unknown")
            attempts = c["attempts"] or 1
            retry = failure and (retry_failed or (failure in TRANSIENT_ERRORS and attempts < max_attempts))
            if retry:
                if self.fingerprints.get(c["uri"], c["fingerprint"]) == c["fingerprint"]:
                    self.attempts[vid] = attempts  # a changed file starts counting again
            else:
                done.add((vid, c["fingerprint"]))
        return done

    def add(self, table: pa.Table) -> list[str]:
        """Take a batch of stream rows; return the ids of the videos it completed. Rows stay Arrow (the per-row
        Python values read are the small columns only: a row's embedding is never a Python list)."""
        if table.schema != STREAM_SCHEMA:
            table = table.select(STREAM_SCHEMA.names).cast(STREAM_SCHEMA)
        small = table.select(["kind", "video_id", "uri", "n_segments", "node", "encoder_node", "error_type"])
        small = small.to_pylist()
        by_video: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(small):
            by_video[row["video_id"]].append(i)
        completed = []
        for vid, at in by_video.items():
            video = self._videos[vid]
            for i in at:
                video.take(small[i])
            at = [i for i in at if small[i]["kind"] == "segment" or small[i]["error_type"]]  # the rows a shard holds
            complete = video.end is not None and video.received == video.end["n_segments"] + 1
            while at and (video.buffered + len(at) > self.shard_rows or not complete):
                # a long video: each shard_rows of its rows go to a part (also within one batch, as Ray hands
                # the driver whole blocks: a part keeps every shard at most shard_rows rows)
                piece, at = at[:self.shard_rows - video.buffered], at[self.shard_rows - video.buffered:]
                video.tables.append(_rows(table, piece))
                video.buffered += len(piece)
                if video.buffered >= self.shard_rows:
                    video.parts.append(self._write_rows(video.tables))
                    video.tables, video.buffered = [], 0
            if complete:
                if at:
                    video.tables.append(_rows(table, at))
                    video.buffered += len(at)
                self._ready.append(self._videos.pop(vid))
                self._ready_rows += video.buffered
                self._count(video)
                completed.append(vid)
        if self._ready_rows >= self.shard_rows:
            self.flush()
        return completed

    def _count(self, video: _Video) -> None:
        self.segments += video.segments
        if video.failure:
            self.videos_failed += 1
            self.errors_by_type.update(video.errors)
        else:
            self.videos_ok += 1
        self.videos_by_node[video.end.get("node") or "local"] += 1
        self.segments_by_encoder_node.update(video.by_encoder)

    def _write_rows(self, tables: list[pa.Table]) -> str:
        """Write the stream rows of ``tables`` to a new ``segments`` and (if any failed) ``errors`` shard; return
        its name."""
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        rows = pa.concat_tables(tables)  # segment rows, and end rows that carry a failure
        failed = pc.not_equal(rows["error_type"], "")
        bad = rows.filter(failed)
        good = rows.filter(pc.invert(failed)) if bad.num_rows else rows
        if bad.num_rows:
            write_atomic(self._as(bad, ERRORS_SCHEMA), self.out_dir / "errors" / name)
        if good.num_rows:
            dim = pc.list_value_length(good["embedding"])[0].as_py()
            write_atomic(self._as(good, segments_schema(dim)), self.out_dir / "segments" / name)
        return name

    def _as(self, rows: pa.Table, schema: pa.Schema) -> pa.Table:
        """``rows`` (stream rows) as a table of ``schema``, with this run's model and config hash."""
        constant = {"model": self.model, "config_hash": self.config_hash}
        columns = [pa.array([constant[f.name]] * rows.num_rows, f.type) if f.name in constant
                   else rows[f.name].cast(f.type) for f in schema]
        return pa.Table.from_arrays(columns, schema=schema)

    def flush(self) -> None:
        """Commit the finished videos: segments and errors shards, then the manifest shard."""
        if not self._ready:
            return
        name = self._write_rows([t for video in self._ready for t in video.tables])
        now = time.time()
        manifest = [{"video_id": v.end["video_id"], "uri": v.end["uri"],
                     "fingerprint": self.fingerprints.get(v.end["uri"], ""), "config_hash": self.config_hash,
                     "model": self.model, "n_segments": v.segments,
                     "status": ("partial" if v.segments else "failed") if v.failure else "ok",
                     "node": v.end.get("node") or "", "committed_at": now, "error_type": v.failure,
                     "attempts": self.attempts.get(v.end["video_id"], 0) + 1, "parts": v.parts}
                    for v in self._ready]
        write_atomic(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), self.out_dir / "manifest" / name)
        self._ready, self._ready_rows = [], 0

    def unfinished(self) -> list[str]:
        """Videos with rows but no complete set (only after a failure upstream)."""
        return list(self._videos)


def _rows(table: pa.Table, at: list[int]) -> pa.Table:
    """Rows ``at`` (ascending) of ``table``: a zero-copy slice when they are consecutive, as they mostly are."""
    if at and at[-1] - at[0] + 1 == len(at):
        return table.slice(at[0], len(at))
    return table.take(pa.array(at, pa.int64()))


@dataclass
class _Video:
    """A video's rows as they stream in: those not yet in a shard, and what the commit says of all of them."""

    tables: list[pa.Table] = field(default_factory=list)  # stream rows not yet in a shard
    buffered: int = 0  # rows in ``tables``
    parts: list[str] = field(default_factory=list)  # shards holding the earlier ones
    received: int = 0
    end: dict | None = None
    segments: int = 0  # rows encoded without error
    failure: str = ""  # the video's failure: its decode's (the end row), else its first segment's
    errors: Counter = field(default_factory=Counter)  # failed rows by type
    by_encoder: Counter = field(default_factory=Counter)  # segment rows by encoder node

    def take(self, row: dict) -> None:
        """Count one row (its small columns)."""
        self.received += 1
        if row["kind"] == "end":
            self.end = row
        else:
            self.by_encoder[row.get("encoder_node") or "local"] += 1
            self.segments += not row["error_type"]
        if row["error_type"]:
            self.errors[row["error_type"]] += 1
            if row["kind"] == "end" or not self.failure:
                self.failure = row["error_type"]


def write_actions(out_dir: str | Path, actions: list[dict], *, config_hash: str) -> int:
    """Replace ``actions/actions.parquet`` with ``actions`` (rows of :func:`temporal.localize.localize_videos`)."""
    directory = Path(out_dir) / "actions"
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{**a, "config_hash": config_hash} for a in actions]
    write_atomic(pa.Table.from_pylist(rows, schema=ACTIONS_SCHEMA), directory / "actions.parquet")
    return len(rows)
