"""``reeltag search`` and ``reeltag index``: text queries against stored segment embeddings, without decoding.

The index of an output directory is two files per config: ``index/<config>/embeddings.npy`` (float32 ``[N,D]``,
memory-mapped, for exact scores) and ``embeddings_bf16.npy`` (the same in bfloat16, half the bytes to stream
per query), plus ``rows.parquet`` (which segment each row is). It is rebuilt when the committed manifest
changes. A query scores every row in bf16, then the best candidates are re-scored exactly in float32, so the
ranking of the top results is the exact one; overlapping windows of one video are merged into one moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoders.video_text import VideoTextModel, create_model
from pipeline.config import parse_spec
from pipeline.writer import latest_config, read_table, write_atomic
from temporal.files import atomic_path, write_text_atomic


class SearchError(RuntimeError):
    """Nothing to search (no output, no segments, unknown model)."""


@dataclass
class Index:
    embeddings: np.ndarray  # float32 [N, D], memory-mapped
    bf16: np.ndarray  # int16 view of bfloat16 [N, D], memory-mapped
    rows: pa.Table  # video_id, uri, segment_id, start_s, end_s
    model: str  # family:pretrained
    config_hash: str


def build_index(out_dir: str | Path, config_hash: str | None = None) -> Index:
    """Load the index of ``out_dir`` for ``config_hash`` (the latest run's by default), building it if stale."""
    import torch

    out = Path(out_dir)
    if not (out / "manifest").is_dir():
        raise SearchError(f"{out}: not a reeltag output directory (no manifest/)")
    latest = latest_config(out)
    if latest is None:
        raise SearchError(f"{out}: no committed videos (run `reeltag run` first)")
    config_hash = config_hash or latest[0]
    shards = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    stamp = hashlib.sha256(json.dumps([config_hash, shards]).encode()).hexdigest()[:16]
    directory = out / "index" / config_hash
    meta_path = directory / "meta.json"
    if _meta(meta_path).get("stamp") != stamp:  # missing, stale or unreadable: the index is rebuilt
        segments = read_table(out, "segments", config_hash)
        if segments.num_rows == 0:
            raise SearchError(f"{out}: no segments for config {config_hash}")
        model = segments["model"][0].as_py()
        emb = np.stack(segments["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        directory.mkdir(parents=True, exist_ok=True)
        bf16 = torch.from_numpy(emb).to(torch.bfloat16).view(torch.int16).numpy()  # numpy has no bfloat16
        for name, array in (("embeddings.npy", emb), ("embeddings_bf16.npy", bf16)):
            with atomic_path(directory / name) as tmp, open(tmp, "wb") as f:
                np.save(f, array)
        write_atomic(segments.select(["video_id", "uri", "segment_id", "start_s", "end_s"]), directory / "rows.parquet")
        write_text_atomic(meta_path, json.dumps({"stamp": stamp, "model": model, "rows": len(emb)}))
    meta = _meta(meta_path)
    return Index(np.load(directory / "embeddings.npy", mmap_mode="r"),
                 np.load(directory / "embeddings_bf16.npy", mmap_mode="r"),
                 pq.read_table(directory / "rows.parquet"), meta["model"], config_hash)


def _meta(path: Path) -> dict:
    """The index's meta.json, or {} when it is missing or unreadable (a truncated one is rebuilt, not fatal)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def score(index: Index, query: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``top`` rows for a normalised query ``[D]``: bf16 scores over all rows, float32 re-score of the
    best ``max(10 * top, 100)`` candidates (bf16 moves a cosine by < 0.01; the candidates' margin covers it).
    Returns (row indices, cosine scores), best first."""
    import torch

    n = len(index.embeddings)
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    with warnings.catch_warnings():  # the index is a read-only memory map; it is only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        rows = torch.from_numpy(np.asarray(index.bf16))
    rough = rows.view(torch.bfloat16) @ q.to(torch.bfloat16)
    candidates = torch.topk(rough, min(n, max(10 * top, 100))).indices.sort().values.numpy()
    exact = np.asarray(index.embeddings[candidates]) @ query.astype(np.float32)
    best = np.argsort(-exact, kind="stable")[:top]
    return candidates[best], exact[best]


def query_model(out_dir: str | Path, config_hash: str, model: str) -> VideoTextModel:
    """The text side of the model that embedded the segments of ``config_hash``, with the run's weights and dtype
    (``configs/<hash>.json``, saved by the run; outputs written before there was one name only ``model``)."""
    path = Path(out_dir) / "configs" / f"{config_hash}.json"
    if path.exists():
        spec = parse_spec(path.read_text(), source=str(path))
    else:
        family, _, pretrained = model.partition(":")
        spec = parse_spec(json.dumps({"input": {"paths": [str(out_dir)]}, "output": {"dir": str(out_dir)},
                                      "model": {"family": family, "pretrained": pretrained, "dtype": "float32",
                                                "local_files_only": os.path.isdir(pretrained)}}))
    return create_model(spec, tagging=False, video=False, device="cpu")  # the run's weights and dtype; a query
    # is one text: the CPU, whatever device the run's encoders had


def encode_query(model: VideoTextModel, text: str) -> np.ndarray:
    """The query's normalised text embedding, as written (no prompt template)."""
    return model.embed_texts([text])[0].float().cpu().numpy()


def search(out_dir: str | Path, text: str, *, top_k: int = 10, iou: float = 0.3) -> list[dict]:
    """Ranked moments ``{uri, video_id, start_s, end_s, score}`` for ``text``; overlapping windows of a video
    (multi-scale windows from ``segments.localize``) are suppressed in favour of the best one."""
    index = build_index(out_dir)
    query = encode_query(query_model(out_dir, index.config_hash, index.model), text)
    rows, scores = score(index, query, top=max(20 * top_k, 200))
    results: list[dict] = []
    for row, value in zip(rows, scores):
        r = {k: index.rows[k][int(row)].as_py() for k in ("video_id", "uri", "start_s", "end_s")}
        overlaps = [m for m in results if m["video_id"] == r["video_id"] and _iou(m, r) > iou]
        if not overlaps:
            results.append({**r, "score": round(float(value), 5)})
        if len(results) == top_k:
            break
    return results


def _iou(a: dict, b: dict) -> float:
    inter = max(0.0, min(a["end_s"], b["end_s"]) - max(a["start_s"], b["start_s"]))
    union = (a["end_s"] - a["start_s"]) + (b["end_s"] - b["start_s"]) - inter
    return inter / union if union > 0 else 0.0


def format_results(results: list[dict]) -> str:
    lines = [f"{'#':>3}  {'score':>7}  {'start_s':>8}  {'end_s':>8}  uri"]
    lines += [f"{i:>3}  {r['score']:7.4f}  {r['start_s']:8.2f}  {r['end_s']:8.2f}  {r['uri']}"
              for i, r in enumerate(results, start=1)]
    return "\n".join(lines)
