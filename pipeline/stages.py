"""Stages: small classes that declare their resources, load weights in ``setup()`` inside the worker and
transform in ``__call__``. ``jobs/`` maps them onto Ray; :func:`run_sequential` runs them without Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from .config import PipelineSpec
from .decode import DecodeError, decode_size, open_reader, probe, read_chunks, video_id
from .segments import plan_segments
from .writer import STREAM_SCHEMA


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


def _row(kind: str, vid: str, uri: str, **fields) -> dict:
    row = {"kind": kind, "video_id": vid, "uri": uri, "segment_id": -1, "n_segments": 0, "start_s": 0.0,
           "end_s": 0.0, "frame_times_s": np.zeros(0), "frames": np.zeros((0, 1, 1, 3), np.uint8),
           "backend": "", "stage": "", "error_type": "", "message": ""}
    row.update(fields)
    return row


class DecodeStage:
    """1 video -> N segment rows (frames ``[T,H,W,3]`` uint8) + 1 ``end`` row (count, or the failure)."""

    resources = Resources(cpus=1.0)

    def __init__(self, spec: PipelineSpec, *, short_side: int):
        self.spec, self.short_side = spec, short_side

    def setup(self) -> None:
        pass

    def __call__(self, item: dict) -> list[dict]:
        uri = item["uri"]
        vid, rows, backend = video_id(uri), [], ""
        failure: dict = {}
        try:
            info = probe(uri)
            # auto: Decord first; PyAV when Decord cannot open *or read* the file (it fails on some sizes).
            backends = ("decord", "pyav") if self.spec.decode.backend == "auto" else (self.spec.decode.backend,)
            for n, backend in enumerate(backends, start=1):
                try:
                    rows = self._segments(uri, vid, info, backend)
                    break
                except Exception:
                    if n == len(backends):
                        raise
        except DecodeError as e:
            failure = {"stage": "decode", "error_type": e.error_type, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - any decoder failure is this video's, never the job's
            failure = {"stage": "decode", "error_type": type(e).__name__, "message": _first_line(e)}
        return rows + [_row("end", vid, uri, n_segments=len(rows), backend=backend, **failure)]

    def _segments(self, uri: str, vid: str, info, backend: str) -> list[dict]:
        reader = open_reader(uri, backend, decode_size(info, self.short_side), self.spec.decode.threads)
        try:
            times, duration = reader.frame_times()
            seg = self.spec.segments
            plan = plan_segments(times, duration, mode=seg.mode, window_s=seg.window_s, stride_s=self.spec.stride_s,
                                 min_segment_s=seg.min_segment_s, frames=self.spec.sampling.frames)
            return [_row("segment", vid, uri, segment_id=s.segment_id, start_s=s.start_s, end_s=s.end_s,
                         frame_times_s=s.frame_times_s, frames=frames, backend=backend)
                    for s, frames in read_chunks(reader, plan)]
        finally:
            reader.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:500]


class EncodeStage:
    """N segment rows -> N rows with a segment embedding and tags (``end`` rows pass through)."""

    resources = Resources(cpus=1.0)
    batch_size = 4  # segments per call

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def setup(self) -> None:
        import torch

        from encoders import HierarchicalTower, create_encoder, label_embeddings, load_vocabulary
        from temporal import build_pooler

        torch.set_num_threads(self.spec.ray.threads_per_actor)
        m = self.spec.model
        self.encoder = create_encoder(m.family, pretrained=m.pretrained, local_files_only=m.local_files_only,
                                      dtype=m.dtype, device=m.device)
        self.tower = HierarchicalTower(self.encoder, levels=self.spec.tower.levels, fusion=self.spec.tower.fusion,
                                       batch_size=m.batch_size)
        self.pooler = build_pooler(self.spec.temporal.pooling, self.encoder.embed_dim)
        self.labels = load_vocabulary(self.spec.tags.vocabulary) if self.spec.tags.vocabulary else []
        self.label_emb = label_embeddings(self.encoder, self.labels, self.spec.tags.prompts) if self.labels else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for i in range(len(batch["kind"])):
            row = {k: batch[k][i] for k in STREAM_SCHEMA.names if k in batch}
            if row["kind"] == "segment":
                row.update(self._encode(batch["frames"][i], row["frame_times_s"]))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)

    def _encode(self, frames: np.ndarray, times_s: np.ndarray) -> dict:
        import torch

        from encoders import tag_probabilities, top_tags
        from temporal import mean_pool

        try:
            with torch.inference_mode():
                fused, _, _ = self.tower(torch.from_numpy(np.ascontiguousarray(frames)))
                x = fused[None]  # [1, T, D]
                if self.pooler is None:
                    emb = mean_pool(x)
                else:
                    emb = self.pooler(x, torch.as_tensor(times_s, dtype=torch.float32)[None])
                tags = top_tags(tag_probabilities(emb, self.label_emb, self.encoder.logit_scale), self.labels,
                                self.spec.tags.top_k)[0] if self.labels else []
        except Exception as e:  # noqa: BLE001 - a segment that cannot be encoded is recorded, not fatal
            return {"stage": "encode", "error_type": type(e).__name__, "message": _first_line(e)}
        return {"embedding": emb[0].numpy().astype(np.float32), "tags": tags}


def run_sequential(spec: PipelineSpec, uris: Iterable[str], *, short_side: int) -> pa.Table:
    """Decode and encode without Ray (tests, debugging); returns the stream rows."""
    decode, encode = DecodeStage(spec, short_side=short_side), EncodeStage(spec)
    decode.setup()
    encode.setup()
    tables = []
    for uri in uris:
        rows = decode({"uri": uri})
        batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
        tables.append(encode(batch))
    return pa.concat_tables(tables)
