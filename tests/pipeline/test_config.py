"""Pipeline definitions: every error names the file line, the key path and the problem. Parsing is pure data;
check_spec checks the filesystem and lists the inputs once."""

from __future__ import annotations

import builtins
import dataclasses
import os
import shutil
import textwrap
import typing
from pathlib import Path

import pytest
import torch

from encoders.models import resolve_dtype
from jobs.cli import main
from pipeline.config import ConfigError, PipelineSpec, load_spec, parse_spec
from pipeline.validate import check_spec, config_hash, resolved
from temporal.checkpoint import HeadShape, save_checkpoint


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


def _checked(text: str, command: str = "run", overrides=(), source="pipeline.yaml") -> list[str]:
    """The problems check_spec finds in a config that parses."""
    spec = parse_spec(text, source=source, overrides=list(overrides))
    with pytest.raises(ConfigError) as info:
        check_spec(spec, command=command)
    return info.value.problems


def test_valid_file_fills_defaults(files):
    spec = parse_spec(_yaml(files))
    assert spec.segments.mode == "window" and spec.segments.window_s == 4.0 and spec.stride_s == 4.0
    assert spec.tower.levels == (1,) and spec.temporal.pooling == "mean" and spec.ray.address is None
    videos = check_spec(spec)
    assert [Path(v).name for v in videos] == ["broken.mp4", "clip0.mp4", "clip1.mp4", "clip2.mp4"]


def test_bad_value_names_line_key_and_value(files):
    text = _yaml(files, """\
        segments:
          mode: window
          window_s: -2
        """)
    assert _errors(text) == ["pipeline.yaml:11 segments.window_s: must be at least 0.01 s (a frame), got -2"]


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
        "pipeline.yaml:8 model.family: must be one of auto, clip, align, siglip, metaclip2, xclip, got 'clap'",
        "pipeline.yaml:9 tower.fusion: 'global' uses level 1 only; set tower.levels: [1] or fusion: mean",
    ]


def test_missing_files_are_named(files):
    text = _yaml(files).replace(str(files["vocab"]), "nope/labels.txt").replace(str(files["videos"]), "nope.mp4")
    assert _checked(text) == ["pipeline.yaml:2 input.paths.0: not found: nope.mp4",  # every problem at once
                              "pipeline.yaml:6 tags.vocabulary: file not found: nope/labels.txt"]
    text = _yaml(files).replace(str(files["videos"]), "nope.mp4")
    assert _checked(text) == ["pipeline.yaml:2 input.paths.0: not found: nope.mp4"]
    text = _yaml(files).replace(str(files["videos"]), str(files["videos"]) + "/*.webm")
    assert _checked(text) == [f"pipeline.yaml:2 input.paths.0: no video files match: {files['videos']}/*.webm"]
    text = _yaml(files).replace(str(files["model"]), "./no-such-model")
    assert _checked(text) == ["pipeline.yaml:4 model.pretrained: directory not found: ./no-such-model"]
    text = _yaml(files, "temporal: {pooling: attention, checkpoint: nope/head}\ntrain: {eval_manifest: nope.jsonl}\n")
    assert _checked(text) == ["pipeline.yaml:9 temporal.checkpoint: not found: nope/head",
                              "pipeline.yaml:10 train.eval_manifest: file not found: nope.jsonl"]
    listing = _yaml(files).replace(f"paths: [{files['videos']}]", "manifest: nope.txt")
    assert _checked(listing) == ["pipeline.yaml:2 input.manifest: file not found: nope.txt"]
    assert "--set tags.vocabulary: file not found: gone.txt" in _checked(text, overrides=["tags.vocabulary=gone.txt"])


def test_parsing_never_touches_the_filesystem(files, monkeypatch):
    """Paths are data until check_spec: no stat, no listing, no open (an S3 prefix is not listed while parsing)."""

    text = _yaml(files, "temporal: {pooling: attention, checkpoint: head}\ntower: {levels: [1, 2], fusion: attention}\n"
                        "input: {manifest: list.txt}\ntrain: {manifest: m.jsonl}\n").replace(
        f"input:\n  paths: [{files['videos']}]\n", "")

    def no_io(*args, **kwargs):
        raise AssertionError(f"filesystem access while parsing: {args}")

    for name in ("stat", "lstat", "scandir", "listdir"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr(builtins, "open", no_io)
    spec = parse_spec(text, overrides=["model.pretrained=s3-cache/clip", "input.paths=['s3://bucket/archive']"])
    monkeypatch.undo()
    assert spec.input.paths == ("s3://bucket/archive",) and spec.temporal.checkpoint == "head"


def test_a_hub_id_is_taken_as_written_and_a_path_must_be_a_directory(files, tmp_path, monkeypatch):
    """`.`, `/`, `~`: a path; an existing directory: local; `org/name` otherwise: a hub id (asked when the model
    loads); anything else cannot be a hub id, so it must be a directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    for pretrained in ("openai/clip-vit-base-patch32", "clip-b32", "models/mine", str(files["model"]), "./models"):
        assert check_spec(parse_spec(_yaml({**files, "model": pretrained}))), pretrained
    assert _checked(_yaml({**files, "model": "runs/a/model"})) == [
        "pipeline.yaml:4 model.pretrained: not a hub id (org/name) nor an existing directory: runs/a/model"]
    assert _checked(_yaml({**files, "model": "~/no-such-model"})) == [
        f"pipeline.yaml:4 model.pretrained: directory not found: {os.path.expanduser('~/no-such-model')}"]
    assert _errors(_yaml(files), ["model.pretrained=''"]) == [
        "--set model.pretrained: required: a hub id (org/name) or a local checkpoint directory"]


def test_required_sections(files):
    text = _yaml(files).replace(f"output:\n  dir: {files['out']}\n", "")
    assert _errors(text) == ["pipeline.yaml output.dir: required: where segments/, errors/ and run.json are written"]


def test_input_is_required_except_by_a_training_config(files, tmp_path, capsys):
    no_input = _yaml(files).replace(f"input:\n  paths: [{files['videos']}]\n", "")
    assert _checked(no_input, "validate") == ["pipeline.yaml input.paths: required: video files, directories, "
                                              "globs or URIs (or input.manifest)"]
    assert _checked(no_input, "run") == ["pipeline.yaml input.paths: required: video files, directories, globs or "
                                         "URIs (or input.manifest) for `reeltag run`"]
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text('{"uri": "clip0.mp4", "caption": "a red circle"}\n')
    config = tmp_path / "train.yaml"
    config.write_text(no_input + f"train:\n  manifest: {manifest}\n")
    spec = parse_spec(config.read_text())
    for command in ("validate", "train", "eval"):  # valid: training reads train.manifest
        assert check_spec(spec, command=command) == []
    assert check_spec(parse_spec(no_input), command="train") == []  # no manifest: `reeltag train` says so itself
    for command in ("run", "index"):  # but there is nothing to tag
        assert main([command, str(config)]) == 2
        assert f"{config} input.paths: required: video files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="command must be one of"):
        check_spec(spec, command="tag")


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
    assert spec.segments.window_s == 2.5 and check_spec(spec) == [str(a), str(b)] and spec.ray.address == "auto"
    assert _errors(_yaml(files), ["segments.window_s=-1"]) == [
        "--set segments.window_s: must be at least 0.01 s (a frame), got -1"]
    assert _errors(_yaml(files), ["segments.window"])[0].startswith("--set segments.window: expected key.path=value")
    assert _errors(_yaml(files), ["nosuch.key=1"])[0].startswith("--set nosuch: unknown key")


def test_load_spec_reports_the_file_name(tmp_path, files):
    path = tmp_path / "pipeline.yaml"
    path.write_text(_yaml(files, "sampling:\n  frames: 0\n"))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:10 sampling.frames: must be > 0 and at most 512, got 0"):
        load_spec(path)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_spec(tmp_path / "missing.yaml")


def test_a_local_model_retrained_in_place_changes_the_config_hash(files, tmp_path):
    """Same path, new weights: a resumed run must not take the old model's segments as done."""
    model = shutil.copytree(files["model"], tmp_path / "model")
    text = _yaml({**files, "model": model})
    before = config_hash(parse_spec(text))
    assert config_hash(parse_spec(text)) == before  # stable while nothing changes
    (weights,) = model.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert config_hash(parse_spec(text)) != before


def test_config_hash_ignores_placement_but_not_the_model(files):
    base = parse_spec(_yaml(files))
    assert config_hash(parse_spec(_yaml(files), overrides=["ray.encoder_actors=3", "output.dir=/tmp/x"])) == \
        config_hash(base)
    assert config_hash(parse_spec(_yaml(files), overrides=["segments.window_s=2"])) != config_hash(base)


def test_shipped_configs_validate(tmp_path):
    """Every shipped config parses; those that point at data the demo or `make demo-model` generates (under runs/
    or reeltag-demo/) only fail on those paths."""
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        spec = load_spec(path)  # parsing needs nothing on disk
        try:
            check_spec(spec, command="validate")
        except ConfigError as e:
            missing = ("not found", "no video files", "nor an existing directory")
            assert all(any(m in p for m in missing) for p in e.problems), (path, e.problems)


def test_inputs_from_a_uri_list_and_from_filesystem_uris(files, archive, tmp_path):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two videos\n{archive / 'clip0.mp4'}\nclip1.mp4\n")
    (tmp_path / "clip1.mp4").write_bytes((archive / "clip1.mp4").read_bytes())
    spec = parse_spec(_yaml(files).replace(f"paths: [{archive}]", f"manifest: {listing}"))
    assert check_spec(spec) == sorted([str(archive / "clip0.mp4"), str(tmp_path / "clip1.mp4")])
    uri_spec = parse_spec(_yaml(files).replace(f"paths: [{archive}]", f"paths: ['file://{archive}']"))
    assert check_spec(uri_spec) == sorted(f"file://{archive}/{name}" for name in ("broken.mp4", "clip0.mp4",
                                                                                 "clip1.mp4", "clip2.mp4"))
    assert _checked(_yaml(files).replace(f"paths: [{archive}]", f"paths: ['file://{tmp_path}/none']")) == [
        f"pipeline.yaml:2 input.paths.0: not found: file://{tmp_path}/none"]
    both = parse_spec(_yaml(files).replace(f"paths: [{archive}]", f"paths: [{archive}]\n  manifest: {listing}"))
    assert len(check_spec(both)) == 5  # clip0.mp4 named twice is listed once
    bad = tmp_path / "videos.jsonl"
    bad.write_text('{"uri": "a.mp4"}\n{"path": "b.mp4"}\n')
    assert _checked(_yaml(files).replace(f"paths: [{archive}]", f"manifest: {bad}")) == [
        f"pipeline.yaml:2 input.manifest: {bad}:2: each line needs a 'uri' string"]


def test_an_attention_fusion_needs_a_head_trained_with_it(files, tmp_path):
    """`tower.fusion: attention` is trained with the head: its checkpoint must hold a fusion for these views."""
    head = tmp_path / "head"
    save_checkpoint(head, HeadShape(dim=16).build(), HeadShape(dim=16), torch.tensor(2.0), epoch=1, settings={})
    text = _yaml(files, f"""\
        tower: {{levels: [1, 2], fusion: attention}}
        temporal: {{pooling: attention, checkpoint: {head}}}
        """)
    [problem] = _checked(text)
    assert problem.startswith("pipeline.yaml:9 tower.fusion: attention needs a fusion trained for levels [1, 2]")
    assert "has no view fusion" in problem
    assert check_spec(parse_spec(text), command="train")  # `reeltag train` trains the fusion
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text('{"uri": "clip0.mp4", "caption": "a red circle"}\n')
    assert check_spec(parse_spec(text + f"train: {{manifest: {manifest}}}\n"), command="validate")  # so does this
    no_head = _yaml(files, "tower: {levels: [1, 2], fusion: attention}\n")
    assert _checked(no_head, "eval") == ["pipeline.yaml:9 tower.fusion: attention is trained with the temporal head: "
                                         "set temporal.checkpoint to one trained with this tower (`reeltag train` "
                                         "trains one)"]
    (head / "head.json").write_text("{not json")
    [problem] = _checked(text)
    assert problem.startswith("pipeline.yaml:10 temporal.checkpoint: cannot read") and "head.json" in problem


def test_a_checkpoint_is_named_by_its_directory_or_its_head_file(files, tmp_path):
    """temporal.checkpoint takes either; validation once refused the file (it checked for a directory)."""
    head = tmp_path / "head"
    save_checkpoint(head, HeadShape(dim=16).build(), HeadShape(dim=16), torch.tensor(2.0), epoch=1, settings={})
    for path in (head, head / "head.safetensors"):
        assert check_spec(parse_spec(_yaml(files, f"temporal: {{pooling: attention, checkpoint: {path}}}\n")))
    (head / "head.safetensors").unlink()
    text = _yaml(files, f"temporal: {{pooling: attention, checkpoint: {head}}}\n")
    assert _checked(text) == [f"pipeline.yaml:9 temporal.checkpoint: no head.safetensors in {head}"]


def test_config_hash_is_made_of_the_fields_that_change_a_row(files):
    """Raising decode.recycle_after or model.batch_size on resume must not redo every video; a longer window
    must."""
    base = config_hash(parse_spec(_yaml(files)))
    same = ["decode.timeout_s=5", "decode.chunk_segments=2", "decode.recycle_after=7", "decode.threads=4",
            "model.batch_size=3", "model.local_files_only=true", "ray.encoder_actors=3", "ray.num_cpus=2",
            "output.dir=/tmp/x", "output.shard_rows=10", f"input.paths=[{files['videos']}/clip0.mp4]",
            "train.epochs=2", "train.manifest=elsewhere.jsonl"]
    for override in same:
        assert config_hash(parse_spec(_yaml(files), overrides=[override])) == base, override
    changed = ["segments.window_s=2", "sampling.frames=4", "decode.short_side_px=64", "decode.exact=false",
               "decode.backend=pyav", "tower.tile_overlap=0.25", "tags.threshold=0.7", "tags.top_k=2",
               "model.device=cuda", "sampling.seed=1"]
    hashes = {o: config_hash(parse_spec(_yaml(files), overrides=[o])) for o in changed}
    assert base not in hashes.values() and len(set(hashes.values())) == len(changed), hashes
    fp32, bf16 = (config_hash(parse_spec(_yaml(files), overrides=[f"model.dtype={d}"]))
                  for d in ("float32", "bfloat16"))
    assert fp32 != bf16


def test_the_fields_left_out_of_the_hash_are_the_ones_decided():
    """A new field changes rows (and is hashed) unless it says otherwise; these say so."""
    hints, out = typing.get_type_hints(PipelineSpec), []
    for top in dataclasses.fields(PipelineSpec):
        if not top.metadata.get("output", True):
            out.append(top.name)  # the whole section
        else:
            out += [f"{top.name}.{f.name}" for f in dataclasses.fields(hints[top.name])
                    if not f.metadata.get("output", True)]
    assert sorted(out) == sorted(["input", "output", "ray", "train", "locations", "decode.threads", "decode.timeout_s",
                                  "decode.chunk_segments", "decode.recycle_after", "decode.max_attempts",
                                  "decode.max_duration_s",
                                  "decode.max_pixels", "decode.max_aspect", "decode.max_memory_mb",
                                  "model.local_files_only", "model.batch_size"])


def test_dtype_auto_is_resolved_once_and_hashed_as_resolved(files):
    """A mixed cluster must not write bf16 and fp32 embeddings under one hash: the driver resolves auto."""
    cpu = parse_spec(_yaml(files))
    here = resolve_dtype("auto", torch.device("cpu"))
    assert cpu.model.dtype == "auto" and resolved(cpu).model.dtype == here
    assert resolved(cpu).model.device == "cpu" and resolved(resolved(cpu)) == resolved(cpu)
    assert config_hash(cpu) == config_hash(resolved(cpu)) == \
        config_hash(parse_spec(_yaml(files), overrides=[f"model.dtype={here}"]))
    gpu = parse_spec(_yaml(files), overrides=["ray.gpus_per_actor=1"])  # encoder actors get a GPU: bf16
    assert resolved(gpu).model.dtype == "bfloat16" and resolved(gpu).model.device == "cuda"
    assert config_hash(gpu) == config_hash(parse_spec(_yaml(files), overrides=["model.device=cuda",
                                                                     "model.dtype=bfloat16"]))
    pinned = parse_spec(_yaml(files), overrides=["model.dtype=float32", "ray.gpus_per_actor=1"])
    assert resolved(pinned).model.dtype == "float32" and resolved(pinned).model.device == "cuda"


def test_locations_travel_with_the_spec(files):

    spec = parse_spec(_yaml(files), source="p.yaml")
    assert spec.locations[("tags", "vocabulary")] == "p.yaml:6"
    moved = dataclasses.replace(spec, tags=dataclasses.replace(spec.tags, vocabulary="gone.txt"))
    with pytest.raises(ConfigError, match="p.yaml:6 tags.vocabulary: file not found: gone.txt"):
        check_spec(moved)
    assert moved != spec and dataclasses.replace(spec, locations={}) == spec  # not part of the value
    assert "locations=" not in repr(spec)
    (problem,) = _errors(_yaml(files, "locations: {}\n"))
    assert problem.startswith("pipeline.yaml:9 locations: unknown key")


def test_a_training_key_the_mode_does_not_use_is_an_error(files, tmp_path):
    """max_shift and mean_loss act only when the whole model trains; with a frozen backbone they were silently
    ignored. Whole-model training on tiles was refused only once training had started."""
    for key in ("max_shift: 0.1", "mean_loss: 0.5", "precision: bfloat16"):
        with pytest.raises(ConfigError, match=rf"train\.{key.split(':')[0]}: is used only when the whole model"):
            parse_spec(_yaml(files, f"train: {{{key}}}\n"))
    assert parse_spec(_yaml(files, "train: {backbone: scratch, max_shift: 0.1, mean_loss: 0.5, precision: float32}\n"))
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text('{"uri": "a.mp4", "caption": "x"}\n')
    tiles = parse_spec(_yaml(files, f"train: {{backbone: finetune, manifest: '{manifest}'}}\n"
                                    "tower: {levels: [1, 2], fusion: mean}\n"))
    with pytest.raises(ConfigError, match=r"tower\.levels: train\.backbone: finetune trains on the whole frame"):
        check_spec(tiles, command="train")
