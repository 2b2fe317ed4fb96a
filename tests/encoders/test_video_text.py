"""The one model a spec becomes: batched encoding equals one segment at a time, the model rules hold for library
callers, and search gets the run's weights and dtype."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.video_text import create_model, model_problems, segments_per_call
from jobs.run import run_pipeline, save_config
from jobs.search import query_model
from pipeline.config import ConfigError, parse_spec
from pipeline.stages import EncodeStage
from temporal.checkpoint import CheckpointError


def _spec(tmp_path, model_dir, vocab=None, extra: str = "", overrides: tuple[str, ...] = ()):
    tags = f"tags: {{vocabulary: '{vocab}', top_k: 2}}\n" if vocab else ""
    return parse_spec(f"input: {{paths: ['{tmp_path}']}}\nmodel: {{pretrained: '{model_dir}', dtype: float32}}\n"
                      f"output: {{dir: '{tmp_path}/out'}}\nsampling: {{frames: 4}}\n{tags}{extra}", overrides=overrides)


def _rows(sizes: list[tuple[int, int]], frames: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"kind": "segment", "video_id": f"v{i}", "uri": f"v{i}.mp4", "segment_id": 0, "n_segments": 0,
             "start_s": 0.0, "end_s": 2.0, "frame_times_s": np.linspace(0.1, 1.9, frames),
             "frames": rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8), "backend": "", "node": "",
             "stage": "", "error_type": "", "message": ""} for i, (h, w) in enumerate(sizes)]


def _batch(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def test_the_encode_stage_puts_many_segments_in_one_backbone_call(tmp_path, tiny_clip_dir, vocab_file):
    """model.batch_size counts images: 4 segments of 4 frames (videos of different sizes) are one call of 16, and
    each segment's embedding and tags are what it gets encoded alone."""
    spec = _spec(tmp_path, tiny_clip_dir, vocab_file, overrides=("model.batch_size=16",))
    stage = EncodeStage(spec)
    assert stage.batch_size == 4 == segments_per_call(spec)
    stage.setup()
    calls = []
    forward = stage.model.encoder.forward_features
    stage.model.encoder.forward_features = lambda x: calls.append(len(x)) or forward(x)
    rows = _rows([(48, 64), (64, 48), (48, 64), (40, 40)])
    together = stage(_batch(rows)).to_pylist()
    assert calls == [16]
    for row, out in zip(rows, together):
        alone = stage(_batch([row])).to_pylist()[0]
        np.testing.assert_allclose(out["embedding"], alone["embedding"], atol=1e-5)
        assert [t["label"] for t in out["tags"]] == [t["label"] for t in alone["tags"]]
    assert calls[1:] == [4, 4, 4, 4]


def test_a_segment_that_cannot_be_encoded_is_its_own_error_row(tmp_path, tiny_clip_dir):
    stage = EncodeStage(_spec(tmp_path, tiny_clip_dir))
    rows = _rows([(48, 64)] * 3)
    rows[1]["frames"] = rows[1]["frames"][..., :2]  # two channels: not an RGB frame
    out = stage(_batch(rows)).to_pylist()
    assert [r["stage"] for r in out] == ["", "encode", ""] and out[1]["error_type"] and out[1]["embedding"] is None
    assert len(out[0]["embedding"]) == len(out[2]["embedding"]) == 16


def test_model_rules_hold_for_library_callers(tmp_path, tiny_clip_dir):
    """tower.fusion: attention without a trained checkpoint is refused by run_pipeline itself, on the driver, with
    the key named (was a ValueError inside a Ray actor), and by the factory."""
    spec = _spec(tmp_path, tiny_clip_dir, extra="tower: {levels: [1, 2], fusion: attention}\n")
    (key, message), = model_problems(spec)
    assert key == "tower.fusion" and "temporal.checkpoint" in message
    assert model_problems(spec, training=True) == []  # reeltag train trains the fusion
    with pytest.raises(ConfigError, match="tower.fusion: attention is trained with the temporal head"):
        run_pipeline(spec)
    with pytest.raises(CheckpointError, match="tower.fusion"):
        create_model(spec)
    assert not (tmp_path / "out" / "segments").exists()  # refused before anything was written


def test_search_embeds_queries_with_the_runs_weights_and_dtype(tmp_path, tiny_clip_dir):
    spec = _spec(tmp_path, tiny_clip_dir, overrides=("model.dtype=bfloat16",))
    out = tmp_path / "out"
    out.mkdir()
    save_config(out, spec, "abc")
    model = query_model(out, "abc", f"clip:{tiny_clip_dir}")
    assert str(model.encoder.dtype) == "torch.bfloat16"
    run_side = create_model(spec, tagging=False)
    np.testing.assert_array_equal(model.embed_texts(["red circle"]).float().numpy(),
                                  run_side.embed_texts(["red circle"]).float().numpy())
    # an output written before configs/ existed: the model column, in float32
    assert str(query_model(out, "old", f"clip:{tiny_clip_dir}").encoder.dtype) == "torch.float32"
