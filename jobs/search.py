"""``reeltag search`` and ``reeltag index``: queries (text, a stored segment, a still image) against the stored
segment embeddings of an output directory, without decoding, with pre-filters on video, tag and time.

The index of a config lives in ``output.dir/index/<config>/`` and follows the manifest's commits: each update
reads only the segments of the videos committed (or replaced) since the last one, appends them as a new chunk
(float32 embeddings ``chunk-N.f32``, memory-mapped, and the filter columns ``chunk-N.arrow``), marks the rows of
replaced videos deleted, and adds the new rows to a FAISS IVF-PQ index (above :data:`ANN_MIN_ROWS` live rows;
below it every query is an exact scan). The coarse quantiser is trained again (the index rebuilt from the
chunks, streaming) when the live rows have doubled since it was trained or half the rows are deleted. Every
file an update writes has a new name and ``meta.json``, renamed into place last, names the set in use: an
update killed midway leaves the previous index whole. ANN candidates are always re-ranked exactly in float32.
Why FAISS and not LanceDB: measured on the same data here (README "Search and index").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from encoders.video_text import VideoTextModel, create_model, decode_short_side
from pipeline.config import parse_spec
from pipeline.writer import commit_keys, committed_rows, latest_config, output_lock
from temporal.files import atomic_path, write_text_atomic

FORMAT = 4  # meta.json's "format": an index of another format is rebuilt
ANN_MIN_ROWS = 100_000  # live rows from which queries use the ANN index (below: exact scan; see the benchmark)
TAGS_PER_ROW = 8  # a row's best stored tags that the tag filter sees (and all its region tags)
REGION = "region:"  # a region tag's label in the postings: the same vocabulary, its own filter
NPROBE = 16  # inverted lists visited per query (of about sqrt(rows))
MIN_CANDIDATES = 1000  # ANN candidates re-ranked exactly (at least; 10 per result asked for). PQ's error, not the
# lists visited, decides recall (benchmark, 2M rows): 300 candidates gave recall@10 0.70, 500 0.86, 1000 0.998,
# at any of 16, 32, 64 lists of 1,414
EXACT_FILTERED_ROWS = 20_000  # a filter that leaves at most this many rows is answered by an exact scan of them
INDEX_FILE = re.compile(r"(chunk-\d{6}\.(f32|arrow|tags\.arrow)|(ivfpq|deleted|commits|videos)-\d{6}\.\w+)")
CHUNK_FILES = ("f32", "arrow", "tags.arrow")


class SearchError(RuntimeError):
    """Nothing to search (no output, no segments), or a query that names what is not there."""


@dataclass
class Chunk:
    embeddings: np.ndarray  # float32 [n, D], memory-mapped
    video: np.ndarray  # int32 [n]: row of the videos table
    segment_id: np.ndarray  # int32 [n]
    start_s: np.ndarray  # float64 [n]
    end_s: np.ndarray  # float64 [n]
    # the tag filter's postings: one entry per (row, tag), sorted by label, then by confidence, highest first
    tag_label: np.ndarray  # int32: index into Index.labels
    tag_row: np.ndarray  # int32: row in the chunk
    tag_confidence: np.ndarray  # float32


@dataclass
class Index:
    directory: Path
    meta: dict
    chunks: list[Chunk]
    offsets: np.ndarray  # int64 [len(chunks) + 1]: global row id of each chunk's first row
    deleted: np.ndarray  # bool [rows]
    videos: pa.Table  # video_id, uri
    ann: object | None  # faiss.IndexIVFPQ, or None: exact scans only
    _columns: dict = field(default_factory=dict, repr=False)

    @property
    def config_hash(self) -> str:
        return self.meta["config_hash"]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def rows(self) -> int:
        """Live (committed) segment rows."""
        return int(len(self.deleted) - self.deleted.sum())

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    def embedding(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), D]`` of global row ids (sorted or not)."""
        out = np.empty((len(rows), self.meta["dim"]), np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for c in np.unique(which):
            at = which == c
            out[at] = self.chunks[c].embeddings[rows[at] - self.offsets[c]]
        return out

    def rows_of(self, video: int) -> np.ndarray:
        """Global row ids of one video (an index into ``videos``), live or not, in row order."""
        if "_by_video" not in self._columns:
            order = np.argsort(self.column("video"), kind="stable")
            self._columns["_by_video"] = (order, np.searchsorted(self.column("video")[order],
                                                                 np.arange(len(self.videos) + 1)))
        order, bounds = self._columns["_by_video"]
        return order[bounds[video]:bounds[video + 1]]

    def column(self, name: str) -> np.ndarray:
        """One per-row column over all chunks (concatenated once, then kept)."""
        if name not in self._columns:
            self._columns[name] = np.concatenate([getattr(c, name) for c in self.chunks]) if self.chunks else \
                np.zeros(0)
        return self._columns[name]


# ---------------------------------------------------------------------------------------------------- building


def build_index(out_dir: str | Path, config_hash: str | None = None) -> Index:
    """The index of ``out_dir`` for ``config_hash`` (the latest run's by default), brought up to date with the
    manifest's commits first (under the index's own lock: a run writing the output meanwhile is not waited for)."""
    out = Path(out_dir)
    if not (out / "manifest").is_dir():
        raise SearchError(f"{out}: not a reeltag output directory (no manifest/)")
    latest = latest_config(out)
    if latest is None:
        raise SearchError(f"{out}: no committed videos (run `reeltag run` first)")
    config_hash = config_hash or latest[0]
    directory = out / "index" / config_hash
    directory.mkdir(parents=True, exist_ok=True)
    with output_lock(directory, wait=True):  # one update at a time; searches meanwhile read the previous index
        meta = _meta(directory / "meta.json")
        if meta.get("format") != FORMAT or meta.get("config_hash") != config_hash:
            meta = {}
        listing = _listing(out)
        if not meta or meta.get("listing") != listing:  # a commit, or a shard moved away, since the last look
            keys = commit_keys(out, config_hash)
            if not meta or _read_commits(directory, meta) != keys:
                meta = _update(out, directory, meta, keys, config_hash)
                _remove_unnamed(directory, meta)
            write_text_atomic(directory / "meta.json", json.dumps({**meta, "listing": listing}, indent=1) + "\n")
    for attempt in range(3):
        try:
            index = open_index(directory)
            break
        except FileNotFoundError:  # another search's update replaced the files just now: read its meta.json
            if attempt == 2:
                raise
    if index.rows == 0:
        raise SearchError(f"{out}: no segments for config {config_hash}")
    return index


def _listing(out: Path) -> str:
    """A digest of the shard names in the output's tables: what a reader sees changes only when this does (shards
    get new names, never new contents), so an unchanged listing spares reading every manifest shard."""
    names = [f"{t}/{p.name}" for t in ("manifest", "segments", "errors") if (out / t).is_dir()
             for p in sorted((out / t).iterdir())]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:32]


def _meta(path: Path) -> dict:
    """The index's meta.json, or {} when it is missing or unreadable (a truncated one is rebuilt, not fatal)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_commits(directory: Path, meta: dict) -> dict[str, str]:
    table = ipc.open_file(pa.memory_map(str(directory / meta["commits"]))).read_all()
    return dict(zip(table["video_id"].to_pylist(), table["commit"].to_pylist()))


def _write_arrow(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _update(out: Path, directory: Path, meta: dict, keys: dict[str, str], config_hash: str) -> dict:
    """Write the files of the next index generation and its meta.json; return that meta."""
    generation = meta.get("generation", 0) + 1
    old = _read_commits(directory, meta) if meta else {}
    changed = {vid for vid, key in keys.items() if old.get(vid) != key}
    gone = {vid for vid in old if old[vid] != keys.get(vid)}  # replaced or no longer committed
    meta = meta or {"format": FORMAT, "config_hash": config_hash, "chunks": [], "chunk_rows": [], "rows": 0,
                    "dim": None,
                    "model": None, "labels": [], "ann": None, "trained_rows": 0, "deleted": None}
    meta = {**meta, "generation": generation, "chunks": list(meta["chunks"]), "labels": list(meta["labels"])}
    videos = (ipc.open_file(pa.memory_map(str(directory / meta["videos"]))).read_all() if meta.get("videos")
              else pa.table({"video_id": pa.array([], pa.string()), "uri": pa.array([], pa.string())}))
    deleted = np.load(directory / meta["deleted"]) if meta["deleted"] else np.zeros(meta["rows"], bool)
    video_of = {v: i for i, v in enumerate(videos["video_id"].to_pylist())}
    if gone:  # their rows leave the index; a video committed again gets new rows in the new chunk
        ids = pa.array(sorted(video_of[v] for v in gone if v in video_of), pa.int32())
        for name, offset in zip(meta["chunks"], _offsets(meta)):
            video = _chunk_table(directory, name)["video"]
            at = np.flatnonzero(pc.is_in(video, value_set=ids).to_numpy(zero_copy_only=False))
            deleted[offset + at] = True
    first = meta["rows"]
    if changed:
        meta, videos, added = _append_chunk(out, directory, meta, videos, video_of, changed, config_hash, generation)
        deleted = np.concatenate([deleted, np.zeros(added, bool)])
    meta["deleted"] = f"deleted-{generation:06d}.npy"
    with atomic_path(directory / meta["deleted"]) as tmp, open(tmp, "wb") as f:
        np.save(f, deleted)
    meta["videos"] = f"videos-{generation:06d}.arrow"
    _write_arrow(videos, directory / meta["videos"])
    meta["commits"] = f"commits-{generation:06d}.arrow"
    _write_arrow(pa.table({"video_id": pa.array(list(keys), pa.string()),
                           "commit": pa.array(list(keys.values()), pa.string())}), directory / meta["commits"])
    meta = _update_ann(directory, meta, deleted, first, generation)
    write_text_atomic(directory / "meta.json", json.dumps(meta, indent=1) + "\n")  # the commit of the update
    return meta


def _offsets(meta: dict) -> list[int]:
    return list(np.cumsum([0] + meta["chunk_rows"][:-1])) if meta["chunks"] else []


def _append_chunk(out: Path, directory: Path, meta: dict, videos: pa.Table, video_of: dict[str, int],
                  changed: set[str], config_hash: str, generation: int) -> tuple[dict, pa.Table, int]:
    """Stream the committed segment rows of ``changed`` (one shard at a time) into a new chunk."""
    name = f"chunk-{generation:06d}"
    labels = {label: i for i, label in enumerate(meta["labels"])}
    columns: dict[str, list] = {k: [] for k in ("video", "segment_id", "start_s", "end_s")}
    postings: dict[str, list] = {k: [] for k in ("tag_label", "tag_row", "tag_confidence")}
    new_videos: list[tuple[str, str]] = []
    rows = 0
    with atomic_path(directory / f"{name}.f32") as tmp, open(tmp, "wb") as f:
        for _, table in committed_rows(out, "segments", config_hash, videos=changed,
                                       columns=["uri", "segment_id", "start_s", "end_s", "embedding", "tags",
                                                "region_tags", "model"]):
            if table.num_rows == 0:
                continue
            emb = np.asarray(pc.list_flatten(table["embedding"]).to_numpy(zero_copy_only=False), np.float32)
            dim = len(emb) // table.num_rows
            if meta["dim"] not in (None, dim):
                raise SearchError(f"{out}: segments of config {config_hash} have embeddings of {dim} and "
                                  f"{meta['dim']} values")
            meta["dim"], meta["model"] = dim, meta["model"] or table["model"][0].as_py()
            f.write(emb.tobytes())
            for vid, uri in zip(table["video_id"].to_pylist(), table["uri"].to_pylist()):
                if vid not in video_of:
                    video_of[vid] = len(video_of)
                    new_videos.append((vid, uri))
            columns["video"].append(np.array([video_of[v] for v in table["video_id"].to_pylist()], np.int32))
            columns["segment_id"].append(table["segment_id"].to_numpy().astype(np.int32))
            columns["start_s"].append(table["start_s"].to_numpy())
            columns["end_s"].append(table["end_s"].to_numpy())
            for column, prefix, most in (("tags", "", TAGS_PER_ROW), ("region_tags", REGION, None)):
                tags = table[column].combine_chunks()
                flat = pc.list_flatten(tags)
                parent = pc.list_parent_indices(tags).to_numpy()
                rank = np.arange(len(parent)) - tags.offsets.to_numpy()[parent]  # a tag's place in its row's list
                best = rank < (most or len(rank) + 1)
                names = flat.field("label").dictionary_encode()
                ids = np.array([labels.setdefault(prefix + n, len(labels)) for n in names.dictionary.to_pylist()],
                               np.int32)
                postings["tag_label"].append(ids[names.indices.to_numpy()[best]])
                postings["tag_row"].append((rows + parent[best]).astype(np.int32))
                postings["tag_confidence"].append(flat.field("confidence").to_numpy()[best].astype(np.float32))
            rows += table.num_rows
    if rows == 0:
        (directory / f"{name}.f32").unlink()
        return meta, videos, 0
    _write_arrow(pa.table({k: np.concatenate(v) for k, v in columns.items()}), directory / f"{name}.arrow")
    tag = {k: np.concatenate(v) for k, v in postings.items()}
    order = np.lexsort((-tag["tag_confidence"], tag["tag_label"]))
    _write_arrow(pa.table({k: v[order] for k, v in tag.items()}), directory / f"{name}.tags.arrow")
    if new_videos:
        videos = pa.concat_tables([videos, pa.table({"video_id": pa.array([v for v, _ in new_videos], pa.string()),
                                                     "uri": pa.array([u for _, u in new_videos], pa.string())})])
    meta["chunks"] = [*meta["chunks"], name]
    meta["chunk_rows"] = [*meta["chunk_rows"], rows]
    meta["rows"] += rows
    meta["labels"] = list(labels)
    return meta, videos, rows


def _chunk_table(directory: Path, name: str) -> pa.Table:
    return ipc.open_file(pa.memory_map(str(directory / f"{name}.arrow"))).read_all()


def _update_ann(directory: Path, meta: dict, deleted: np.ndarray, first_new: int, generation: int) -> dict:
    """Add the new rows to the IVF-PQ index, or train it (again) when the data has outgrown it."""
    import faiss

    live = int(len(deleted) - deleted.sum())
    if live < ANN_MIN_ROWS:
        return {**meta, "ann": None, "trained_rows": 0}
    retrain = meta["ann"] is None or live > 2 * meta["trained_rows"] or deleted.sum() > len(deleted) / 2
    if retrain:
        index = _train(directory, meta, deleted)
        meta = {**meta, "trained_rows": live}
        first_new = 0
    else:
        index = faiss.read_index(str(directory / meta["ann"]))
        gone = np.flatnonzero(deleted[:first_new])
        if len(gone):
            index.remove_ids(gone.astype(np.int64))
    for start, block in _blocks(directory, meta, first_new):
        ids = np.arange(start, start + len(block), dtype=np.int64)
        keep = ~deleted[ids]
        index.add_with_ids(block[keep], ids[keep])
    name = f"ivfpq-{generation:06d}.faiss"
    with atomic_path(directory / name) as tmp:
        faiss.write_index(index, str(tmp))
    return {**meta, "ann": name}


def _blocks(directory: Path, meta: dict, first: int, size: int = 16384):
    """(global row id, float32 block) of the rows from ``first`` on, read from the chunk files (not mapped: a
    build reads every row once and keeps none)."""
    dim = meta["dim"]
    for name, offset, n in zip(meta["chunks"], _offsets(meta), meta["chunk_rows"]):
        if offset + n <= first:
            continue
        with open(directory / f"{name}.f32", "rb") as f:
            start = max(first - offset, 0)
            f.seek(start * dim * 4)
            while start < n:
                count = min(size, n - start)
                yield offset + start, np.fromfile(f, np.float32, count * dim).reshape(count, dim)
                start += count


def _train(directory: Path, meta: dict, deleted: np.ndarray):
    """A new IVF-PQ index (inner product: the embeddings are normalised) trained on a sample of the live rows:
    about sqrt(rows) lists, 64 sub-quantisers of 8 bits (64 bytes a row)."""
    import faiss

    live = np.flatnonzero(~deleted)
    lists = int(np.clip(np.sqrt(len(live)), 64, 65536))
    sample = np.sort(np.random.default_rng(0).choice(live, min(len(live), 64 * lists), replace=False))
    x = np.empty((len(sample), meta["dim"]), np.float32)
    row_bytes = meta["dim"] * 4
    offsets = np.array(_offsets(meta) + [meta["rows"]])
    which = np.searchsorted(offsets, sample, side="right") - 1
    for c in np.unique(which):  # read row by row: a memory map's fault-around would make most of the file resident
        fd = os.open(directory / f"{meta['chunks'][c]}.f32", os.O_RDONLY)
        try:
            for i in np.flatnonzero(which == c):
                x[i] = np.frombuffer(os.pread(fd, row_bytes, int(sample[i] - offsets[c]) * row_bytes), np.float32)
        finally:
            os.close(fd)
    subquantisers = 64 if meta["dim"] % 64 == 0 else next(m for m in (32, 16, 8, 4, 2, 1) if meta["dim"] % m == 0)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(meta["dim"]), meta["dim"], lists, subquantisers, 8,
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 16  # 64 sample rows a list is enough to place its centroid
    index.train(x)
    return index


def _remove_unnamed(directory: Path, meta: dict) -> None:
    """Remove the index files of earlier generations (only names this module writes; meta.json names the rest)."""
    named = {meta.get("ann"), meta.get("deleted"), meta.get("videos"), meta.get("commits"),
             *(f"{c}.{ext}" for c in meta["chunks"] for ext in CHUNK_FILES)}
    for f in directory.iterdir():
        if INDEX_FILE.fullmatch(f.name) and f.name not in named and f.is_file() and not f.is_symlink():
            f.unlink()
    for f in ("embeddings.npy", "embeddings_bf16.npy", "rows.parquet"):  # an index of format 1
        if (directory / f).is_file():
            (directory / f).unlink()


def open_index(directory: Path) -> Index:
    import faiss

    meta = _meta(directory / "meta.json")
    chunks = []
    for name, n in zip(meta["chunks"], meta["chunk_rows"]):
        t, tags = _chunk_table(directory, name), _chunk_table(directory, f"{name}.tags")
        chunks.append(Chunk(np.memmap(directory / f"{name}.f32", np.float32, "r", shape=(n, meta["dim"])),
                            *(t[c].to_numpy() for c in ("video", "segment_id", "start_s", "end_s")),
                            *(tags[c].to_numpy() for c in ("tag_label", "tag_row", "tag_confidence"))))
    ann = faiss.read_index(str(directory / meta["ann"])) if meta.get("ann") else None  # (in memory: 64 B a row)
    if ann is not None:
        ann.nprobe = NPROBE
    index = Index(directory, meta, chunks, np.array(_offsets(meta) + [meta["rows"]], np.int64),
                  np.load(directory / meta["deleted"]),
                  ipc.open_file(pa.memory_map(str(directory / meta["videos"]))).read_all(), ann)
    for name in ("video", "segment_id", "start_s", "end_s"):  # once, here: not in a query's took_ms
        index.column(name)
    if len(index.videos):
        index.rows_of(0)  # the per-video row order, for moments
    return index


# ---------------------------------------------------------------------------------------------------- querying


@dataclass(frozen=True)
class Filters:
    """Pre-filters: ``video`` (a video id or its uri), ``tag`` among a segment's stored tags with at least
    ``min_confidence``, segments starting at or after ``after`` and ending at or before ``before`` (seconds)."""

    video: str | None = None
    tag: str | None = None
    min_confidence: float = 0.0
    after: float | None = None
    before: float | None = None
    region: str | None = None  # a label among the segment's region tags (tiles' or detector boxes'), same confidence

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.video, self.tag, self.after, self.before, self.region))


NO_FILTERS = Filters()


def allowed(index: Index, filters: Filters) -> np.ndarray:
    """bool ``[rows]``: the live rows the filters keep."""
    keep = ~index.deleted
    if filters.video is not None:
        ids, uris = index.videos["video_id"].to_pylist(), index.videos["uri"].to_pylist()
        matches = [i for i, (v, u) in enumerate(zip(ids, uris)) if filters.video in (v, u)]
        if not matches:
            raise SearchError(f"--video: no committed video {filters.video!r} in this index")
        keep &= np.isin(index.column("video"), matches)
    for flag, name, prefix in (("--tag", filters.tag, ""), ("--region", filters.region, REGION)):
        if name is None:
            continue
        if prefix + name not in index.labels:
            known = [label[len(prefix):] for label in index.labels if label.startswith(prefix) and (
                prefix or not label.startswith(REGION))]
            raise SearchError(f"{flag}: no segment {'has a region' if prefix else 'is'} tagged {name!r} (labels: "
                              f"{', '.join(known[:10]) or 'none'}{', …' if len(known) > 10 else ''})")
        label = index.labels.index(prefix + name)
        hit = np.zeros(len(keep), bool)
        for c, offset in zip(index.chunks, index.offsets):  # the label's postings, best first: a prefix of them
            first, last = np.searchsorted(c.tag_label, [label, label + 1])
            passing = np.searchsorted(-c.tag_confidence[first:last], -filters.min_confidence, side="right")
            hit[offset + c.tag_row[first:first + passing]] = True
        keep &= hit
    if filters.after is not None:
        keep &= index.column("start_s") >= filters.after
    if filters.before is not None:
        keep &= index.column("end_s") <= filters.before
    return keep


def nearest(index: Index, query: np.ndarray, top: int, filters: Filters = NO_FILTERS) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` live rows (passing ``filters``) nearest a normalised query ``[D]``: (row ids, cosine scores),
    best first. Exact scan below :data:`ANN_MIN_ROWS` rows or for a filter that leaves few rows; else the IVF-PQ
    candidates (``max(10 * top, MIN_CANDIDATES)``, restricted to the filter's rows) re-ranked exactly in float32."""
    import faiss

    query = np.ascontiguousarray(query, np.float32)
    keep = allowed(index, filters) if filters else None
    if index.ann is None or (keep is not None and keep.sum() <= EXACT_FILTERED_ROWS):
        return _exact(index, query, top, keep)
    candidates = max(10 * top, MIN_CANDIDATES)
    params = None
    if keep is not None:  # visit more lists the fewer rows the filter keeps (the selector skips the others cheaply)
        bitmap = np.packbits(keep, bitorder="little")  # alive while the search runs
        nprobe = int(min(index.ann.nlist, np.ceil(NPROBE * len(keep) / max(int(keep.sum()), 1))))
        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(bitmap), nprobe=nprobe)
    _, ids = index.ann.search(query[None], candidates, params=params)
    ids = np.sort(ids[0][ids[0] >= 0])
    if len(ids) < min(top, int(keep.sum()) if keep is not None else top):
        return _exact(index, query, top, keep)  # the lists visited held too few of the filter's rows
    exact = index.embedding(ids) @ query
    best = np.argsort(-exact, kind="stable")[:top]
    return ids[best], exact[best]


def _exact(index: Index, query: np.ndarray, top: int, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    keep = ~index.deleted if keep is None else keep
    ids, scores = [], []
    for c, offset in zip(index.chunks, index.offsets):
        rows = np.flatnonzero(keep[offset:offset + len(c.video)])
        if len(rows) == len(c.video):
            s = np.asarray(c.embeddings) @ query
        elif len(rows):
            s = np.asarray(c.embeddings[rows]) @ query
        else:
            continue
        best = np.argpartition(-s, min(top, len(s)) - 1)[:top] if len(s) > top else np.arange(len(s))
        ids.append(offset + (rows[best] if len(rows) < len(c.video) else best))
        scores.append(s[best])
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids, scores = np.concatenate(ids), np.concatenate(scores)
    order = np.lexsort((ids, -scores))[:top]
    return ids[order], scores[order]


def _run_spec(out_dir: str | Path, config_hash: str, model: str):
    """The spec that wrote the segments of ``config_hash``: ``configs/<hash>.json``, saved by the run (outputs
    written before there was one name only ``model``)."""
    path = Path(out_dir) / "configs" / f"{config_hash}.json"
    if path.exists():
        return parse_spec(path.read_text(), source=str(path))
    family, _, pretrained = model.partition(":")
    return parse_spec(json.dumps({"input": {"paths": [str(out_dir)]}, "output": {"dir": str(out_dir)},
                                  "model": {"family": family, "pretrained": pretrained, "dtype": "float32",
                                            "local_files_only": os.path.isdir(pretrained)}}))


def query_model(out_dir: str | Path, config_hash: str, model: str) -> VideoTextModel:
    """The text side of the model that embedded the segments of ``config_hash``, with the run's weights and dtype,
    on the CPU (a query is one text, whatever device the run's encoders had)."""
    return create_model(_run_spec(out_dir, config_hash, model), tagging=False, video=False, device="cpu")


def encode_query(model: VideoTextModel, text: str) -> np.ndarray:
    """The query's normalised text embedding, as written (no prompt template)."""
    return model.embed_texts([text])[0].float().cpu().numpy()


def encode_image(out_dir: str | Path, index: Index, path: str | Path | bytes,
                 model: VideoTextModel | None = None) -> np.ndarray:
    """A still's embedding by the run's whole video model: the image as a one-frame segment (X-CLIP: a still video
    of its ``num_frames``), at the short side the run decoded frames at, so it lands where the stored segments
    are. ``path``: a file, or the image's bytes (an upload); ``model``: the run's model, if already loaded."""
    import io

    import av

    name = "the uploaded image" if isinstance(path, bytes) else str(path)
    try:  # PyAV (FFmpeg) reads PNG, JPEG, WebP, TIFF, BMP, …
        with av.open(io.BytesIO(path) if isinstance(path, bytes) else str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, IndexError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else "no picture in it"
        raise SearchError(f"--image {name}: not an image this machine can read ({why})") from None
    spec = _run_spec(out_dir, index.config_hash, index.model)
    scale = decode_short_side(spec) / min(frame.width, frame.height)
    image = frame.to_ndarray(width=max(1, round(frame.width * scale)), height=max(1, round(frame.height * scale)),
                             format="rgb24", interpolation="BICUBIC")
    model = model or image_model(out_dir, index)
    k = model.encoder.frames_per_call  # X-CLIP embeds videos of k frames: the still as k identical frames
    return model.encode([np.repeat(image[None], k, axis=0)], [np.zeros(k)])[0]["embedding"]


def image_model(out_dir: str | Path, index: Index) -> VideoTextModel:
    """The run's whole video model (no tags), on the CPU: what embeds a still."""
    return create_model(_run_spec(out_dir, index.config_hash, index.model), tagging=False, device="cpu")


def like(index: Index, ref: str) -> np.ndarray:
    """The stored embedding of ``VIDEO_ID:SEGMENT_ID``."""
    vid, _, segment = ref.rpartition(":")
    if not vid or not segment.lstrip("-").isdigit():
        raise SearchError(f"--like {ref!r}: expected VIDEO_ID:SEGMENT_ID, for example 3f2a…:12")
    ids = index.videos["video_id"].to_pylist()
    if vid not in ids:
        raise SearchError(f"--like {ref!r}: no committed video {vid!r} in this index")
    rows = np.flatnonzero((index.column("video") == ids.index(vid)) & (index.column("segment_id") == int(segment))
                          & ~index.deleted)
    if not len(rows):
        raise SearchError(f"--like {ref!r}: video {vid} has no committed segment {segment}")
    return index.embedding(rows[:1])[0]


MERGE = 0.4  # a window joins a moment when its score is above best - MERGE * (best - the video's median score)


def search_index(index: Index, query: np.ndarray, *, top_k: int = 10, filters: Filters = NO_FILTERS,
                 exclude: str | None = None) -> list[dict]:
    """Ranked moments for an embedded query: each the best window (its ``segment_id``, ``score``) with its full
    extent, ``start_s``/``end_s`` covering the overlapping or adjacent windows of the video that match too
    (:func:`moment_extent`); a window mostly inside a moment already found is not another result."""
    rows, scores = nearest(index, query, max(20 * top_k, 200), filters)
    video, segment = index.column("video"), index.column("segment_id")
    start, end = index.column("start_s"), index.column("end_s")
    ids, uris = index.videos["video_id"], index.videos["uri"]
    keep = allowed(index, filters) if filters else ~index.deleted
    results: list[dict] = []
    for row, value in zip(rows, scores):
        v = int(video[row])
        if exclude == f"{ids[v].as_py()}:{int(segment[row])}":
            continue
        s, e = float(start[row]), float(end[row])
        if any(m["video_id"] == ids[v].as_py() and min(e, m["end_s"]) - max(s, m["start_s"]) > 0.5 * (e - s)
               for m in results):
            continue
        s, e = moment_extent(index, query, row, keep)
        results.append({"video_id": ids[v].as_py(), "uri": uris[v].as_py(), "segment_id": int(segment[row]),
                        "start_s": s, "end_s": e, "score": round(float(value), 5)})
        if len(results) == top_k:
            break
    return results


def moment_extent(index: Index, query: np.ndarray, row: int, keep: np.ndarray) -> tuple[float, float]:
    """``(start_s, end_s)`` of the moment around window ``row``, read off the video's finest windows (the shortest
    length it has: with ``segments.localize``, the smallest scale): the run of overlapping or adjacent ones that
    score above ``best - MERGE * (best - median)`` among them and reach the window ``row``. A window alone when
    none of them does, or the video has fewer than three."""
    start, end = index.column("start_s"), index.column("end_s")
    lo, hi = float(start[row]), float(end[row])
    rows = index.rows_of(int(index.column("video")[row]))
    rows = rows[keep[rows]]
    length = end[rows] - start[rows]
    rows = rows[length <= length.min() * 1.01 + 1e-9]
    if len(rows) < 3:
        return lo, hi
    scores = index.embedding(rows) @ query
    best = float(scores.max())
    matching = rows[scores >= best - MERGE * (best - float(np.median(scores)))]
    spans = sorted(zip(start[matching].tolist(), end[matching].tolist()))
    run = [(s, e) for s, e in spans if s < hi and e > lo]  # the matching fine windows inside the window
    if not run:
        return lo, hi
    lo, hi = min(s for s, _ in run), max(e for _, e in run)
    grown = True
    while grown:
        grown = False
        for s, e in spans:
            if s <= hi + 1e-6 and e >= lo - 1e-6 and (s < lo or e > hi):
                lo, hi, grown = min(lo, s), max(hi, e), True
    return lo, hi


def search(out_dir: str | Path, text: str | None = None, *, image: str | Path | bytes | None = None,
           like_segment: str | None = None, top_k: int = 10, filters: Filters = NO_FILTERS,
           index: Index | None = None, models: dict | None = None) -> dict:
    """``{"query", "took_ms", "results"}`` for one query: ``text``, a still ``image`` (a file or its bytes) or
    ``like_segment`` (``VIDEO_ID:SEGMENT_ID``). ``took_ms`` is the index's own time (filters, search, re-rank),
    not the model's. ``index`` and ``models`` (a dict this fills: the text side and the whole model, keyed by
    config) let a server keep them between queries; by default the index is brought up to date and opened."""
    if sum(q is not None for q in (text, image, like_segment)) != 1:
        raise SearchError("give exactly one query: a text, --image FILE or --like VIDEO_ID:SEGMENT_ID")
    index = index or build_index(out_dir)
    models = {} if models is None else models
    if like_segment is not None:
        vector, query = like(index, like_segment), {"like": like_segment}
    elif image is not None:
        key = ("image", index.config_hash)
        if key not in models:
            models[key] = image_model(out_dir, index)
        vector = encode_image(out_dir, index, image, models[key])
        query = {"image": "upload" if isinstance(image, bytes) else str(image)}
    else:
        key = ("text", index.config_hash)
        if key not in models:
            models[key] = query_model(out_dir, index.config_hash, index.model)
        vector, query = encode_query(models[key], text), {"text": text}
    started = time.perf_counter()
    results = search_index(index, vector, top_k=top_k, filters=filters, exclude=like_segment)
    took = (time.perf_counter() - started) * 1000
    filters_used = {k: v for k, v in vars(filters).items()
                    if v is not None and (k != "min_confidence" or filters.tag or filters.region)}
    return {"query": {**query, "top_k": top_k, **filters_used}, "took_ms": round(took, 3), "results": results}


def format_results(results: list[dict]) -> str:
    lines = [f"{'#':>3}  {'score':>7}  {'start_s':>8}  {'end_s':>8}  uri"]
    lines += [f"{i:>3}  {r['score']:7.4f}  {r['start_s']:8.2f}  {r['end_s']:8.2f}  {r['uri']}"
              for i, r in enumerate(results, start=1)]
    return "\n".join(lines)
