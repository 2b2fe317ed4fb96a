"""The job's own ceiling (run by hand): segment rows per second the driver's writer commits.

    python benchmarks/driver_commit.py [--rows 100000] [--gpu-segments-per-s 500]

All segment rows of a run pass through one ``OutputWriter`` on the driver. This feeds it synthetic stream rows of
realistic size (a 512-d float32 embedding, 8 frame times, 5 tags, 4 region tags; 100 segments a video) in the
batches the encode stage emits (16 rows), as Arrow tables like those Ray Data hands the driver, and measures the
rows/s it commits to real Parquet (the whole ``add`` + ``flush`` path, including fsync'ed renames). The cluster
size at which the driver saturates is that rate over one encoder's rate: ``--gpu-segments-per-s`` (an assumption,
not measured here: no GPU; CLIP B/32 at a few thousand images/s on a current GPU is ~500 segments of 8 frames).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.search_scale import cpu_name  # noqa: E402
from pipeline.writer import STREAM_SCHEMA, OutputWriter  # noqa: E402

PER_VIDEO, BATCH, DIM = 100, 16, 512


def stream_batches(rows: int) -> list[pa.Table]:
    """Segment rows in batches of BATCH, each video's end row after its segments."""
    rng = np.random.default_rng(0)
    out, pending = [], []
    for v in range(rows // PER_VIDEO):
        vid, uri = f"video{v:07d}", f"/archive/video{v:07d}.mp4"
        for i in range(PER_VIDEO):
            pending.append({"kind": "segment", "video_id": vid, "uri": uri, "segment_id": i, "n_segments": 0,
                            "start_s": 4.0 * i, "end_s": 4.0 * i + 4, "frame_times_s": list(4.0 * i + np.arange(8) / 2),
                            "embedding": rng.standard_normal(DIM).astype(np.float32),
                            "tags": [{"label": f"label{k}", "score": 0.1, "confidence": 0.5} for k in range(5)],
                            "region_tags": [{"label": "x", "score": 0.1, "confidence": 0.5, "box": [0, 0, .5, .5]}] * 4,
                            "backend": "pyav", "node": "", "encoder_node": "n", "stage": "", "error_type": "",
                            "message": ""})
        pending.append({"kind": "end", "video_id": vid, "uri": uri, "n_segments": PER_VIDEO, "node": "n"})
        while len(pending) >= BATCH:
            out.append(pa.Table.from_pylist(pending[:BATCH], schema=STREAM_SCHEMA))
            pending = pending[BATCH:]
    if pending:
        out.append(pa.Table.from_pylist(pending, schema=STREAM_SCHEMA))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--gpu-segments-per-s", type=float, default=500.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batches = stream_batches(args.rows)
    rates = []
    for _ in range(args.rounds):
        out = Path(tempfile.mkdtemp(prefix="reeltag-commit-"))
        try:
            writer = OutputWriter(out, config_hash="h", model="m")
            started = time.perf_counter()
            for table in batches:
                writer.add(table)
            writer.flush()
            rates.append(args.rows / (time.perf_counter() - started))
            assert writer.segments == args.rows
        finally:
            shutil.rmtree(out)
    rate = float(np.median(rates))
    print(json.dumps({"cpu": cpu_name(), "rows": args.rows, "segments_per_s": round(rate),
                      "rounds": [round(r) for r in rates],
                      "saturates_at_encoders": round(rate / args.gpu_segments_per_s, 1),
                      "assumed_segments_per_s_per_encoder": args.gpu_segments_per_s}, indent=2))


if __name__ == "__main__":
    main()
