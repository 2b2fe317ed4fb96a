"""The decode and encode stages together, without Ray (the sequential runner), on real files and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoders import load_vocabulary
from pipeline.config import parse_spec
from pipeline.stages import run_sequential

REPO = Path(__file__).resolve().parents[2]


def _spec(archive, model, vocab, tmp_path, extra=""):
    return parse_spec(f"input: {{paths: ['{archive}']}}\nmodel: {{pretrained: '{model}', dtype: float32}}\n"
                      f"tags: {{vocabulary: '{vocab}', top_k: 2}}\noutput: {{dir: '{tmp_path}'}}\n"
                      f"segments: {{window_s: 2.0}}\nsampling: {{frames: 4}}\n{extra}")


def test_tower_levels_give_region_tags_with_boxes(archive, tiny_clip_dir, tmp_path):
    vocab = tmp_path / "v.yaml"
    vocab.write_text("- label: red circle\n  synonyms: [a red ball]\n- blue square\n- green triangle\n")
    spec = _spec(archive, tiny_clip_dir, vocab, tmp_path,
                 "tower: {levels: [1, 2], fusion: mean, fine_frames: middle}\n")
    rows = [r for r in run_sequential(spec, [str(archive / "clip0.mp4")], short_side=64).to_pylist()
            if r["kind"] == "segment"]
    assert len(rows) == 3
    for row in rows:
        assert len(row["region_tags"]) == 4 and len(row["tags"]) == 2
        boxes = np.array([t["box"] for t in row["region_tags"]])
        assert boxes[:, 0].min() == pytest.approx((96 - 64) / 2 / 96) and boxes[:, 3].max() == pytest.approx(1.0)
        assert all(t["label"] in ("red circle", "blue square", "green triangle") for t in row["region_tags"])
        assert all(0 <= t["confidence"] <= 1 for t in row["tags"] + row["region_tags"])


def test_align_checkpoint_runs_the_same_pipeline(archive, tiny_align_dir, vocab_file, tmp_path):
    spec = parse_spec(f"input: {{paths: ['{archive}']}}\nmodel: {{family: align, pretrained: '{tiny_align_dir}', "
                      f"dtype: float32}}\ntags: {{vocabulary: '{vocab_file}'}}\noutput: {{dir: '{tmp_path}'}}\n")
    rows = [r for r in run_sequential(spec, [str(archive / "clip2.mp4")], short_side=36).to_pylist()
            if r["kind"] == "segment"]
    assert len(rows) == 1 and len(rows[0]["embedding"]) == 32 and len(rows[0]["tags"]) == 4
    assert np.linalg.norm(rows[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)


def test_shipped_kinetics_vocabulary():
    vocab = load_vocabulary(REPO / "configs" / "vocab" / "kinetics400.txt")
    assert len(vocab.labels) == 400 and vocab.labels[0] == "abseiling" and vocab.labels[-1] == "zumba"


def test_decode_workers_never_load_torch(archive, tiny_clip_dir, vocab_file, tmp_path):
    """A Ray decode task unpickles the decode stage and runs it; its decoder child imports the decode functions.
    Neither may import torch (190 MB and 2 s each, per worker): the schema and the decode path are torch-free."""
    import pickle
    import subprocess
    import sys

    from pipeline.stages import DecodeStage

    stage = DecodeStage(_spec(archive, tiny_clip_dir, vocab_file, tmp_path), short_side=64)
    (tmp_path / "stage.pkl").write_bytes(pickle.dumps(stage))
    code = ("import pickle, sys; stage = pickle.load(open(sys.argv[1], 'rb'));"
            "rows = list(stage({'uri': sys.argv[2]})); assert rows[-1]['kind'] == 'end' and len(rows) == 4, rows[-1];"
            "print(sorted(m for m in ('torch', 'transformers', 'encoders', 'ray') if m in sys.modules));"
            "import pipeline.stages as s; child = next(iter(s._DECODERS.values())).pid;"  # the decoder process
            "print('libtorch' in open(f'/proc/{child}/maps').read())")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "stage.pkl"), str(archive / "clip0.mp4")],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "False"]
