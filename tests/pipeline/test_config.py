"""Pipeline definitions: every error names the file line, the key path and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_spec, parse_spec


@pytest.fixture
def files(tmp_path, archive, tiny_clip_dir, vocab_file):
    return {"videos": archive, "model": tiny_clip_dir, "vocab": vocab_file, "out": tmp_path / "out"}


def _yaml(files, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        input:
          paths: [{files['videos']}]
        model:
          pretrained: {files['model']}
        tags:
          vocabulary: {files['vocab']}
        output:
          dir: {files['out']}
        """) + textwrap.dedent(extra)


def _errors(text: str, overrides=(), source="pipeline.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(text, source=source, overrides=list(overrides))
    return info.value.problems


def test_valid_file_fills_defaults(files):
    spec = parse_spec(_yaml(files))
    assert spec.segments.mode == "window" and spec.segments.window_s == 4.0 and spec.stride_s == 4.0
    assert spec.tower.levels == (1,) and spec.temporal.pooling == "mean" and spec.ray.address is None
    assert [Path(v).name for v in spec.videos()] == ["broken.mp4", "clip0.mp4", "clip1.mp4", "clip2.mp4"]


def test_bad_value_names_line_key_and_value(files):
    text = _yaml(files, """\
        segments:
          mode: window
          window_s: -2
        """)
    assert _errors(text) == ["pipeline.yaml:11 segments.window_s: must be > 0, got -2"]


def test_unknown_key_lists_the_known_ones(files):
    (problem,) = _errors(_yaml(files, "segments:\n  windows_s: 4\n"))
    assert problem.startswith("pipeline.yaml:10 segments.windows_s: unknown key; known keys: mode, window_s")


def test_unknown_section(files):
    assert _errors(_yaml(files, "segmnets: {}\n"))[0].startswith("pipeline.yaml:9 segmnets: unknown key")


def test_wrong_types(files):
    text = _yaml(files, """\
        sampling:
          frames: 2.5
        tower:
          levels: 1x
        ray:
          verbose: "yes"
        """)
    assert _errors(text) == [
        "pipeline.yaml:10 sampling.frames: expected a whole number, got float 2.5",
        "pipeline.yaml:12 tower.levels: item 0: expected a whole number, got a string",
        "pipeline.yaml:14 ray.verbose: expected true or false, got a string",
    ]


def test_choices_and_section_rules(files):
    text = _yaml(files, """\
        model:
          family: clap
        tower:
          levels: [1, 2]
        """).replace(f"model:\n  pretrained: {files['model']}\n", "")
    assert _errors(text) == [
        "pipeline.yaml:8 model.family: must be one of clip, align, got 'clap'",
        "pipeline.yaml:9 tower.fusion: 'global' uses level 1 only; set tower.levels: [1] or fusion: mean",
    ]


def test_missing_files_are_named(files):
    text = _yaml(files).replace(str(files["vocab"]), "nope/labels.txt").replace(str(files["videos"]), "nope.mp4")
    assert _errors(text) == ["pipeline.yaml:6 tags.vocabulary: file not found: nope/labels.txt"]
    text = _yaml(files).replace(str(files["videos"]), "nope.mp4")
    assert _errors(text) == ["pipeline.yaml:2 input.paths.0: not found: nope.mp4"]
    text = _yaml(files).replace(str(files["videos"]), str(files["videos"]) + "/*.webm")
    assert _errors(text) == [f"pipeline.yaml:2 input.paths.0: no video files match: {files['videos']}/*.webm"]
    text = _yaml(files).replace(str(files["model"]), "./no-such-model")
    assert _errors(text) == ["pipeline.yaml:4 model.pretrained: directory not found: ./no-such-model"]


def test_required_sections(files):
    text = _yaml(files).replace(f"output:\n  dir: {files['out']}\n", "")
    assert _errors(text) == ["pipeline.yaml output.dir: required: where segments/, errors/ and run.json are written"]


def test_input_is_required_except_by_a_training_config(files, tmp_path, capsys):
    from jobs.cli import main

    no_input = _yaml(files).replace(f"input:\n  paths: [{files['videos']}]\n", "")
    assert _errors(no_input) == ["pipeline.yaml input.paths: required: video files, directories, globs or URIs "
                                 "(or input.manifest)"]
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text('{"uri": "clip0.mp4", "caption": "a red circle"}\n')
    config = tmp_path / "train.yaml"
    config.write_text(no_input + f"train:\n  manifest: {manifest}\n")
    assert not parse_spec(config.read_text()).has_input  # valid: training reads train.manifest
    for command in ("run", "index"):  # but there is nothing to tag
        assert main([command, str(config)]) == 2
        assert f"{config} input.paths: required: video files" in capsys.readouterr().err


def test_invalid_yaml_and_duplicate_keys(files):
    (problem,) = _errors("input:\n  paths: [a.mp4\nmodel: {}\n")
    assert problem.startswith("pipeline.yaml:3: not valid YAML")
    assert _errors(_yaml(files, "tags:\n  top_k: 3\n")) == ["pipeline.yaml:9 tags: duplicate key"]
    assert _errors("- a\n- b\n") == ["pipeline.yaml:1: the top level must be a mapping of sections"]


def test_yaml_tags_never_construct_objects(files):
    (problem,) = _errors("input: !!python/object/apply:os.system ['echo hi']\n")
    assert "could not determine a constructor" in problem or "not valid YAML" in problem


def test_overrides_are_parsed_as_yaml_and_validated(files, archive):
    a, b = archive / "clip0.mp4", archive / "clip1.mp4"
    spec = parse_spec(_yaml(files), overrides=["segments.window_s=2.5", f"input.paths=[{a},{b}]", "ray.address=auto"])
    assert spec.segments.window_s == 2.5 and spec.videos() == [str(a), str(b)] and spec.ray.address == "auto"
    assert _errors(_yaml(files), ["segments.window_s=-1"]) == ["--set segments.window_s: must be > 0, got -1"]
    assert _errors(_yaml(files), ["segments.window"])[0].startswith("--set segments.window: expected key.path=value")
    assert _errors(_yaml(files), ["nosuch.key=1"])[0].startswith("--set nosuch: unknown key")


def test_load_spec_reports_the_file_name(tmp_path, files):
    path = tmp_path / "pipeline.yaml"
    path.write_text(_yaml(files, "sampling:\n  frames: 0\n"))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:10 sampling.frames: must be > 0, got 0"):
        load_spec(path)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_spec(tmp_path / "missing.yaml")


def test_a_local_model_retrained_in_place_changes_the_config_hash(files, tmp_path):
    """Same path, new weights: a resumed run must not take the old model's segments as done."""
    import shutil

    model = shutil.copytree(files["model"], tmp_path / "model")
    text = _yaml({**files, "model": model})
    before = parse_spec(text).config_hash()
    assert parse_spec(text).config_hash() == before  # stable while nothing changes
    (weights,) = model.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert parse_spec(text).config_hash() != before


def test_config_hash_ignores_placement_but_not_the_model(files):
    base = parse_spec(_yaml(files))
    assert parse_spec(_yaml(files), overrides=["ray.encoder_actors=3", "output.dir=/tmp/x"]).config_hash() == \
        base.config_hash()
    assert parse_spec(_yaml(files), overrides=["segments.window_s=2"]).config_hash() != base.config_hash()


def test_shipped_configs_validate(tmp_path):
    """Every shipped config parses; those that point at data the demo generates only fail on those paths."""
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        try:
            load_spec(path)
        except ConfigError as e:
            assert all(("not found" in p or "no video files" in p) for p in e.problems), (path, e.problems)


def test_inputs_from_a_uri_list_and_from_filesystem_uris(files, archive, tmp_path):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two videos\n{archive / 'clip0.mp4'}\nclip1.mp4\n")
    (tmp_path / "clip1.mp4").write_bytes((archive / "clip1.mp4").read_bytes())
    spec = parse_spec(_yaml(files).replace(f"paths: [{archive}]", f"manifest: {listing}"))
    assert spec.videos() == sorted([str(archive / "clip0.mp4"), str(tmp_path / "clip1.mp4")])
    uri_spec = parse_spec(_yaml(files).replace(f"paths: [{archive}]", f"paths: ['file://{archive}']"))
    assert uri_spec.videos() == sorted(f"file://{archive}/{name}" for name in ("broken.mp4", "clip0.mp4",
                                                                              "clip1.mp4", "clip2.mp4"))
    assert _errors(_yaml(files).replace(f"paths: [{archive}]", f"paths: ['file://{tmp_path}/none']")) == [
        f"pipeline.yaml:2 input.paths.0: not found: file://{tmp_path}/none"]


def test_an_attention_fusion_needs_a_head_trained_with_it(files, tmp_path):
    """`tower.fusion: attention` is trained with the head: its checkpoint must hold a fusion for these views."""
    import torch

    from temporal.train import HeadShape, TrainSettings, save_checkpoint

    head = tmp_path / "head"
    save_checkpoint(head, HeadShape(dim=16).build(), HeadShape(dim=16), torch.tensor(2.0), epoch=1,
                    settings=TrainSettings())
    text = _yaml(files, f"""\
        tower: {{levels: [1, 2], fusion: attention}}
        temporal: {{pooling: attention, checkpoint: {head}}}
        """)
    [problem] = _errors(text)
    assert problem.startswith("pipeline.yaml:9 tower.fusion: attention needs a fusion trained for levels [1, 2]")
    assert "has no view fusion" in problem
    (head / "head.json").write_text("{not json")
    [problem] = _errors(text)
    assert problem.startswith("pipeline.yaml:10 temporal.checkpoint: cannot read") and "head.json" in problem
