"""The 2026 families through the whole product: ``reeltag run`` on the embedded Ray with a SigLIP 2 NaFlex
checkpoint (``family: auto``, ``dtype: auto``: int8 on x86), OWLv2 region boxes, then ``reeltag search`` by
text and region label and ``reeltag report``; and X-CLIP with its own temporal model, searched by a still."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import av
import numpy as np

from encoders._tiny import save_tiny
from jobs.search import search
from pipeline.config import parse_spec
from pipeline.stages import run_sequential
from pipeline.writer import OutputWriter, read_table
from tests.conftest import VOCAB

REELTAG = [sys.executable, "-m", "jobs.cli"]


def test_siglip2_naflex_with_owlv2_boxes_run_search_and_report(tmp_path, archive, vocab_file):
    siglip2 = save_tiny(tmp_path / "siglip2", family="siglip2", words=VOCAB)
    owlv2 = save_tiny(tmp_path / "owlv2", family="owlv2", words=VOCAB)
    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""\
input: {{paths: [{archive}]}}
segments: {{window_s: 2.0}}
sampling: {{frames: 4}}
model: {{family: auto, pretrained: {siglip2}, local_files_only: true}}
regions: {{detector: owlv2, pretrained: {owlv2}, threshold: 0.05, max_boxes: 4}}
tags: {{vocabulary: {vocab_file}, top_k: 2}}
output: {{dir: {out}}}
ray: {{num_cpus: 2}}
""")
    run = subprocess.run([*REELTAG, "run", str(config)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = read_table(out, "segments").to_pylist()
    assert {r["uri"].rsplit("/", 1)[1] for r in rows} == {"clip0.mp4", "clip1.mp4", "clip2.mp4"}  # two frame sizes
    assert read_table(out, "errors").num_rows == 1  # broken.mp4, and the job went on
    assert all(r["model"].startswith("auto:") for r in rows)
    summary = json.loads((out / "run.json").read_text())
    if platform.machine() == "x86_64":  # dtype auto: int8 here, and the saved config says what the rows are
        assert json.loads((out / "configs" / f"{summary['config_hash']}.json").read_text())["model"]["dtype"] == "int8"
    assert all(0 < len(r["region_tags"]) <= 4 for r in rows)
    for r in rows:
        assert [t["label"] for t in r["tags"]][0] in VOCAB and 0 < r["tags"][0]["confidence"] < 1
        assert all(t["label"] in VOCAB and 0 <= t["box"][0] < t["box"][2] <= 1 for t in r["region_tags"])
    label = rows[0]["region_tags"][0]["label"]
    cli = subprocess.run([*REELTAG, "search", str(out), "a red circle", "--region", label, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    found = json.loads(cli.stdout)
    assert found["query"]["region"] == label and found["results"]
    with_label = {(r["video_id"], r["segment_id"]) for r in rows if any(t["label"] == label
                                                                       for t in r["region_tags"])}
    assert {(r["video_id"], r["segment_id"]) for r in found["results"]} <= with_label
    report = subprocess.run([*REELTAG, "report", str(out)], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert 'class="box"' in (out / "report.html").read_text()  # the boxes are drawn


def test_xclip_runs_with_its_own_temporal_model_and_finds_a_still(tmp_path, archive):
    from PIL import Image

    from jobs.run import save_config

    xclip = save_tiny(tmp_path / "xclip", family="xclip", words=VOCAB)
    out = tmp_path / "out"
    out.mkdir()
    spec = parse_spec(f"input: {{paths: ['{archive}']}}\nmodel: {{family: xclip, pretrained: '{xclip}', dtype: "
                      f"float32}}\nsampling: {{frames: 8}}\ntemporal: {{pooling: model}}\nsegments: {{mode: whole}}\n"
                      f"output: {{dir: '{out}'}}\n")
    save_config(out, spec, "h")
    writer = OutputWriter(out, config_hash="h", model=spec.model_id())
    writer.add(run_sequential(spec, [str(archive / f"clip{i}.mp4") for i in range(3)]))
    writer.flush()
    emb = np.stack(read_table(out, "segments", "h")["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (3, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with av.open(str(archive / "clip2.mp4")) as container:
        Image.fromarray(next(container.decode(video=0)).to_ndarray(format="rgb24")).save(tmp_path / "still.png")
    found = search(out, None, image=tmp_path / "still.png", top_k=3)
    assert len(found["results"]) == 3 and found["query"]["image"] == str(tmp_path / "still.png")


def test_reeltag_trains_its_head_on_siglip2_and_xclip_frame_features(tmp_path):
    """`reeltag train` (frozen backbone) on each new family's frame features, then `reeltag eval` with the head."""
    from dataclasses import replace

    from pipeline.synth import sample_clips, write_clips

    motions = ("moving left", "moving right")
    small = dict(frame_sizes=((64, 48),), fps=(15.0, 15.0), duration_s=(1.2, 1.2), size=(0.3, 0.4), noise=(0.0, 0.0))
    clips = [replace(c, travel=0.8, offset=0.0) for c in sample_clips(24, seed=5, motions=motions, **small)]
    train = write_clips(tmp_path / "train", clips[:16], caption=lambda c: c.motion)
    val = write_clips(tmp_path / "val", clips[16:], caption=lambda c: c.motion)
    for family, frames in (("siglip2", 4), ("xclip", 8)):
        model = save_tiny(tmp_path / family, family=family, words=motions)
        out = tmp_path / f"out-{family}"
        config = tmp_path / f"{family}.yaml"
        config.write_text(f"input: {{paths: ['{tmp_path}/val']}}\nmodel: {{family: auto, pretrained: '{model}', "
                          f"dtype: float32}}\nsampling: {{frames: {frames}}}\ntemporal: {{pooling: attention}}\n"
                          f"output: {{dir: '{out}'}}\ntrain: {{manifest: '{train}', eval_manifest: '{val}', "
                          f"epochs: 2, batch_size: 8}}\n")
        trained = subprocess.run([*REELTAG, "train", str(config)], capture_output=True, text=True, timeout=600)
        assert trained.returncode == 0, trained.stderr
        assert (out / "head" / "head.safetensors").exists()
        evaluated = subprocess.run([*REELTAG, "eval", str(config), "--set", f"temporal.checkpoint={out / 'head'}"],
                                   capture_output=True, text=True, timeout=600)
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads((out / "eval.json").read_text())["pooling"] == "attention"
