"""Stages: small classes that declare their resources, load weights in ``setup()`` inside the worker and
transform in ``__call__``. ``jobs/`` maps them onto Ray; :func:`run_sequential` runs them without Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from ._isolate import IsolatedDecoder
from .config import PipelineSpec
from .decode import (
    DecodeError,
    _first_line,
    choose_backend,
    decode_size,
    low_res_histograms,
    open_reader,
    probe,
    video_id,
)
from .segments import plan_segments, shot_boundaries
from .sources import local_path
from .writer import STREAM_SCHEMA


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


def _row(kind: str, vid: str, uri: str, **fields) -> dict:
    row = {"kind": kind, "video_id": vid, "uri": uri, "segment_id": -1, "n_segments": 0, "start_s": 0.0,
           "end_s": 0.0, "frame_times_s": np.zeros(0), "frames": np.zeros((0, 1, 1, 3), np.uint8),
           "backend": "", "node": "", "stage": "", "error_type": "", "message": ""}
    row.update(fields)
    return row


def decode_rows(uri: str, spec: PipelineSpec, short_side: int) -> Iterator[dict]:
    """1 video -> its segment rows (frames ``[T,H,W,3]`` uint8), a chunk of segments decoded at a time, then one
    ``end`` row: the count, or the failure. Frames decoded before a failure are kept (a truncated file keeps its
    first part and records the truncation). Runs in the decoder process."""
    vid, count, backend, failure = video_id(uri), 0, "", {}
    try:
        with local_path(uri) as path:
            for row in _segment_rows(uri, path, vid, spec, short_side):
                backend = row["backend"]
                count += 1
                yield row
    except DecodeError as e:
        failure = {"stage": "decode", "error_type": e.error_type, "message": str(e)}
    except Exception as e:  # noqa: BLE001 - any decoder failure is this video's, never the job's
        failure = {"stage": "decode", "error_type": type(e).__name__, "message": _first_line(e)}
    yield _row("end", vid, uri, n_segments=count, backend=backend, **failure)


def _segment_rows(uri: str, path: str, vid: str, spec: PipelineSpec, short_side: int) -> Iterator[dict]:
    """The segment rows of the local file ``path`` (``uri`` names it in the output)."""
    info, index = probe(path)
    seg, smp, dec = spec.segments, spec.sampling, spec.decode
    cuts = []
    if seg.mode == "shots":
        hists = low_res_histograms(path, index, threads=dec.threads)
        cuts = shot_boundaries(hists, index.times_s[:len(hists)], threshold=seg.shot_threshold,
                               min_shot_s=seg.min_shot_s)
    plan = plan_segments(index.times_s, index.end_s, mode=seg.mode, window_s=seg.window_s, stride_s=spec.stride_s,
                         min_segment_s=seg.min_segment_s, strategy=smp.strategy, frames=smp.frames,
                         target_fps=smp.target_fps, max_frames=smp.max_frames, seed=smp.seed, key=vid, cuts=cuts,
                         scales_s=seg.scales_s if seg.localize else ())
    size = decode_size(info, short_side)
    needed = len(np.unique(np.concatenate([s.frame_indices for s in plan]))) / len(index.pts)
    backend = choose_backend(info, dec.backend, dec.exact, needed)
    reader = _open(backend, path, info, index, size, dec)
    count = 0
    try:
        for first in range(0, len(plan), dec.chunk_segments):
            group = plan[first:first + dec.chunk_segments]
            needed = np.unique(np.concatenate([s.frame_indices for s in group]))
            try:
                frames = reader.read(needed)
            except DecodeError:
                if reader.name != "decord" or dec.backend != "auto":
                    raise
                reader.close()  # Decord failed mid-file: PyAV takes over from this chunk on
                reader = _open("pyav", path, info, index, size, dec)
                frames = reader.read(needed)
            times = (reader.served_pts - index.pts[0]) * index.time_base  # true times, also when inexact
            for s in group:
                at = np.searchsorted(needed, s.frame_indices)
                yield _row("segment", vid, uri, segment_id=s.segment_id, start_s=s.start_s, end_s=s.end_s,
                           frame_times_s=times[at], frames=frames[at], backend=reader.name)
                count += 1
    finally:
        reader.close()
    if info.duration_s and index.end_s < info.duration_s - max(1.0, 0.05 * info.duration_s):
        raise DecodeError("truncated", f"the file holds {index.end_s:.1f} s of the {info.duration_s:.1f} s its "
                                       f"header declares (truncated); kept {count} segments")


def _open(backend: str, uri: str, info, index, size, dec):
    """Open ``backend``; when ``auto`` picked Decord and it cannot open the file, PyAV."""
    try:
        return open_reader(backend, uri, info, index, size, threads=dec.threads, exact=dec.exact)
    except DecodeError:
        if backend != "decord" or dec.backend != "auto":
            raise
        return open_reader("pyav", uri, info, index, size, threads=dec.threads, exact=dec.exact)


_DECODERS: dict[tuple, IsolatedDecoder] = {}


class DecodeStage:
    """1 video -> N segment rows + 1 ``end`` row, decoded in a child process (see ``_isolate``)."""

    resources = Resources(cpus=1.0)

    def __init__(self, spec: PipelineSpec, *, short_side: int):
        self.spec, self.short_side = spec, short_side
        self._decoder = None

    def setup(self) -> None:
        d = self.spec.decode
        key = (d.timeout_s, d.recycle_after)  # one decoder process per worker process, reused across tasks
        if key not in _DECODERS:
            _DECODERS[key] = IsolatedDecoder(decode_rows, timeout_s=d.timeout_s, recycle_after=d.recycle_after,
                                            timeout_setting="decode.timeout_s")
        self._decoder = _DECODERS[key]

    def __call__(self, item: dict) -> Iterator[dict]:
        if self._decoder is None:
            self.setup()
        uri = item["uri"]
        vid = video_id(uri)

        def failed(error_type: str, message: str, count: int) -> dict:
            return _row("end", vid, uri, n_segments=count, stage="decode", error_type=error_type, message=message)

        yield from self._decoder.run(uri, self.spec, self.short_side, on_fail=failed)

    def __getstate__(self):  # the decoder process belongs to the worker that started it
        return {**self.__dict__, "_decoder": None}


class EncodeStage:
    """N segment rows -> N rows with a segment embedding, tags and region tags (``end`` rows pass through)."""

    resources = Resources(cpus=1.0)
    batch_size = 4  # segments per call

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def setup(self) -> None:
        import torch
        import torch.nn.functional as F

        from encoders import HierarchicalTower, create_encoder, label_embeddings, load_vocabulary, preprocess
        from encoders.text import calibrate, null_images
        from temporal import build_pooler

        torch.set_num_threads(self.spec.ray.threads_per_actor)
        m, t = self.spec.model, self.spec.tower
        self.encoder = create_encoder(m.family, pretrained=m.pretrained, local_files_only=m.local_files_only,
                                      dtype=m.dtype, device=m.device)
        self.tower = HierarchicalTower(self.encoder, levels=t.levels, fusion=t.fusion, batch_size=m.batch_size,
                                       fine_frames=t.fine_frames, overlap=t.tile_overlap)
        if t.fusion == "attention":  # trained with the head; the config checked it was for these views
            from temporal.train import load_fusion

            load_fusion(self.spec.temporal.checkpoint, self.tower.fuse)
        if self.spec.temporal.checkpoint:
            from temporal.train import load_checkpoint

            self.pooler = load_checkpoint(self.spec.temporal.checkpoint)[0]
        else:
            self.pooler = build_pooler(self.spec.temporal.pooling, self.encoder.embed_dim)
        self.vocab = load_vocabulary(self.spec.tags.vocabulary) if self.spec.tags.vocabulary else None
        if self.vocab is not None:
            self.label_emb = label_embeddings(self.encoder, self.vocab, self.spec.tags.prompts)
            reference = null_images(self.encoder.preprocess_cfg.resolution)
            self.calibration = calibrate(F.normalize(self.encoder.forward_features(
                preprocess(reference, self.encoder.preprocess_cfg)), dim=-1), self.label_emb)

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

        try:
            with torch.inference_mode():
                fused, regions, boxes, _ = self.tower(torch.from_numpy(np.ascontiguousarray(frames)))
                emb = self.pool(fused[None], torch.as_tensor(times_s, dtype=torch.float32)[None])  # [1, D]
                tags, region_tags = self.tag(emb), self.tag_regions(regions, boxes)
        except Exception as e:  # noqa: BLE001 - a segment that cannot be encoded is recorded, not fatal
            return {"stage": "encode", "error_type": type(e).__name__, "message": _first_line(e)}
        return {"embedding": emb[0].numpy().astype(np.float32), "tags": tags[0] if tags else [],
                "region_tags": region_tags}

    def pool(self, frames, times_s):
        """``[B,T,D]`` frame embeddings -> ``[B,D]`` segment embeddings."""
        from temporal import mean_pool

        return mean_pool(frames) if self.pooler is None else self.pooler(frames, times_s)

    def tag(self, emb) -> list[list[dict]]:
        from encoders import tag_probabilities, top_tags

        if self.vocab is None:
            return []
        probs = tag_probabilities(emb, self.label_emb, self.encoder.logit_scale)
        return top_tags(probs, self.vocab.labels, self.spec.tags.top_k, self.calibration(emb @ self.label_emb.T))

    def tag_regions(self, regions, boxes) -> list[dict]:
        """Best label of each tile (levels >= 2), from its embedding averaged over the fine frames."""
        import torch.nn.functional as F

        if self.vocab is None or regions.shape[1] < 2:
            return []
        tiles = F.normalize(regions[:, 1:].mean(0), dim=-1)  # [V', D]
        best = self.tag(tiles)
        return [{**b[0], "box": [float(x) for x in box]} for b, box in zip(best, boxes[1:])]


def run_sequential(spec: PipelineSpec, uris: Iterable[str], *, short_side: int) -> pa.Table:
    """Decode and encode without Ray (tests, debugging); returns the stream rows."""
    decode, encode = DecodeStage(spec, short_side=short_side), EncodeStage(spec)
    decode.setup()
    encode.setup()
    tables = []
    for uri in uris:
        rows = list(decode({"uri": uri}))
        batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
        tables.append(encode(batch))
    return pa.concat_tables(tables)
