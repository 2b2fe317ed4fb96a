"""The ``reeltag`` command line. Exit codes: 0 done (some videos may have failed: see the errors table),
2 a user mistake (bad config, bad arguments), 1 the job could not run (output, model, Ray)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from encoders import ModelLoadError, VocabularyError
from pipeline.config import ConfigError, PipelineSpec, load_spec
from pipeline.manifest import ManifestError
from pipeline.synth import SPLITS, sample_clips, write_clips
from pipeline.validate import check_spec, config_hash
from pipeline.writer import OutputError, OutputInUse, output_lock
from temporal.checkpoint import CheckpointError

from .demo import run_demo
from .report import ReportError, write_report
from .run import JobError, PlanError, RayStartError, format_summary, run_pipeline
from .search import Filters, Index, SearchError, build_index, format_results, search
from .train import TrainError, format_metrics, run_eval, run_train

T = TypeVar("T")


def _positive(kind: type) -> Callable[[str], T]:
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, value parsed as YAML (repeatable): --set segments.window_s=4")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reeltag", description="Tag video archives and find actions by text.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config(sub.add_parser("validate", help="check a pipeline definition; print a one-line summary"))
    for name, text in (("run", "run a pipeline as a Ray batch job"),
                       ("index", "run the pipeline on new inputs only, then (re)build the search index")):
        command = sub.add_parser(name, help=text)
        _add_config(command)
        command.add_argument("--wait", action="store_true",
                             help="if another run holds output.dir, wait for it (default: exit 2 naming it)")
        command.add_argument("--retry-failed", action="store_true",
                             help="do the videos that failed again, whatever the failure (default: only transient "
                                  "ones, up to decode.max_attempts runs)")
    train = sub.add_parser("train", help="train the temporal head on train.manifest (resumes if interrupted)")
    _add_config(train)
    train.add_argument("--restart", action="store_true",
                       help="start afresh, replacing a checkpoint in output.dir (default: resume the same job, "
                            "refuse another's)")
    _add_config(sub.add_parser("eval", help="evaluate on train.eval_manifest: R@1/5/10, median rank, top-1, mAP"))
    search = sub.add_parser("search", help="rank stored segments of an output directory for a text query, a still "
                                           "image or a segment")
    search.add_argument("output_dir", help="a reeltag output directory (output.dir of a run)")
    search.add_argument("query", nargs="?", help='what to find, e.g. "a person opening a car door"')
    search.add_argument("--like", metavar="VIDEO_ID:SEGMENT_ID", help="segments like this stored one")
    search.add_argument("--image", metavar="FILE", help="moments that look like this still image")
    search.add_argument("--top-k", type=_positive(int), default=10, help="results to return")
    search.add_argument("--video", help="only this video (its video_id or uri)")
    search.add_argument("--tag", metavar="LABEL", help="only segments with this label among their stored tags")
    search.add_argument("--region", metavar="LABEL", help="only segments with this label among their region tags")
    search.add_argument("--min-confidence", type=float, default=0.0,
                        help="with --tag or --region: the label's least confidence")
    search.add_argument("--after", type=float, metavar="SECONDS", help="only segments starting at or after this")
    search.add_argument("--before", type=float, metavar="SECONDS", help="only segments ending at or before this")
    search.add_argument("--json", action="store_true",
                        help='print one object: {"query", "took_ms" (the index\'s own time), "results"}')
    report = sub.add_parser("report", help="write one self-contained HTML file that summarises an output directory")
    report.add_argument("output_dir", help="a reeltag output directory (output.dir of a run)")
    report.add_argument("--out", help="where to write the HTML (default: OUTPUT_DIR/report.html)")
    serve = sub.add_parser("serve", help="search and watch one or more output directories in a browser")
    serve.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="reeltag output directories")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--token", help="require this token on every API and media request")
    synth = sub.add_parser("synth", help="generate SynthActions clips and their labels.jsonl (train/eval manifest)")
    synth.add_argument("directory", help="where to write NNNN.mp4 and labels.jsonl")
    synth.add_argument("--clips", type=int, default=600, help="how many clips (motions cycle: balanced classes)")
    synth.add_argument("--seed", type=int, default=0, help="the data set is a function of the seed")
    synth.add_argument("--split", choices=sorted(SPLITS), default="actions",
                       help="actions: sizes 8-45%% of the short side; small: 2-4%%, larger frames (for the tower); "
                            "tiny: 3.5-8%% (training only); varied: actions on any background, shade, edge, frame "
                            "size, panning camera and distractor (what trains the demo model); empty: its scenes "
                            "with no shape, captioned 'an empty background' (training only)")
    demo = sub.add_parser("demo", help="generate a small archive and tag it offline with the demo model")
    demo.add_argument("--dir", default="reeltag-demo", help="where the demo writes videos, model and outputs")
    return parser


def summary_line(spec: PipelineSpec, videos: list[str]) -> str:
    """``reeltag validate``'s line: what the spec will do with ``videos`` (check_spec's listing)."""
    vocab = f"tags from {spec.tags.vocabulary}" if spec.tags.vocabulary else "no tags (embeddings only)"
    return (f"ok: {len(videos)} videos, {spec.segments.mode} segments"
            f"{f' of {spec.segments.window_s:g} s' if spec.segments.mode == 'window' else ''}, "
            f"{spec.sampling.frames} frames each, {spec.model_id()}, tower levels {list(spec.tower.levels)}, "
            f"{spec.temporal.pooling} pooling, {vocab} -> {spec.output.dir} (config {config_hash(spec)})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.dir)
        if args.command == "search":
            return _search(args)
        if args.command == "report":
            return _report(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "synth":
            if args.clips <= 0:
                print("reeltag: --clips must be positive", file=sys.stderr)
                return 2
            labels = write_clips(args.directory, sample_clips(args.clips, seed=args.seed, **SPLITS[args.split]),
                                 workers=os.cpu_count() or 1)
            print(f"{args.clips} {args.split} clips and {labels}")
            return 0
        spec = load_spec(args.config, args.overrides)
        if args.command == "validate":
            print(summary_line(spec, check_spec(spec, command="validate")))
            return 0
        if args.command in ("train", "eval"):
            check_spec(spec, command=args.command)
            return _train_or_eval(args.command, spec, restart=getattr(args, "restart", False))
        # run_pipeline checks the spec itself (so the inputs are listed once)
        code = _run(spec, args.command, wait=args.wait, retry_failed=args.retry_failed)
        if code == 0 and args.command == "index":
            code, index = _guarded(lambda: _locked_index(spec, wait=args.wait),
                                   [((OutputInUse,), 2, "reeltag: "), ((SearchError,), 2, "reeltag index: ")])
            if index is not None:
                print(f"index: {index.rows} segments of config {index.config_hash} in "
                      f"{spec.output.dir}/index/{index.config_hash}")
        return code
    except ConfigError as e:
        print(f"reeltag: invalid pipeline definition:\n{e}", file=sys.stderr)
        return 2


Handled = list[tuple[tuple[type[Exception], ...], int, str]]  # (error kinds, exit code, message prefix)


def _guarded(action: Callable[[], T], errors: Handled) -> tuple[int, T | None]:
    """``(0, action())``, or for the first ``(kinds, code, prefix)`` the raised error is one of: one line on stderr,
    ``prefix`` then the error, and ``(code, None)``: 2 for a user mistake, 1 for a job that could not run."""
    try:
        return 0, action()
    except Exception as e:
        for kinds, code, prefix in errors:
            if isinstance(e, kinds):
                print(f"{prefix}{e}", file=sys.stderr)
                return code, None
        raise


def _locked_index(spec: PipelineSpec, *, wait: bool) -> Index:
    """The index of the run just made, built holding output.dir's lock (one writer at a time)."""
    with output_lock(spec.output.dir, wait=wait):
        return build_index(spec.output.dir, config_hash(spec))


def _run(spec: PipelineSpec, command: str, *, wait: bool = False, retry_failed: bool = False) -> int:
    code, summary = _guarded(lambda: run_pipeline(spec, command=command, wait=wait, retry_failed=retry_failed), [
        ((VocabularyError,), 2, "reeltag: invalid pipeline definition:\ntags.vocabulary: "),
        ((OutputInUse, PlanError), 2, "reeltag: "),
        ((JobError, ModelLoadError, RayStartError, OutputError), 1, "reeltag: the job could not run: "),
        ((OSError,), 1, "reeltag: the job could not write its output (what was committed is kept): ")])
    if summary is not None:
        print(format_summary(summary))
    return code


def _search(args: argparse.Namespace) -> int:
    filters = Filters(video=args.video, tag=args.tag, region=args.region, min_confidence=args.min_confidence,
                      after=args.after, before=args.before)
    code, found = _guarded(lambda: search(args.output_dir, args.query, image=args.image, like_segment=args.like,
                                          top_k=args.top_k, filters=filters), [
        ((SearchError, OutputInUse), 2, "reeltag search: "),
        ((ModelLoadError,), 1, "reeltag search: the query cannot be embedded: ")])
    if found is not None:
        print(json.dumps(found, indent=2) if args.json else format_results(found["results"]))
    return code


def _report(args: argparse.Namespace) -> int:
    code, path = _guarded(lambda: write_report(args.output_dir, args.out), [
        ((ReportError,), 2, "reeltag report: "),
        ((OSError,), 1, "reeltag report: the report could not be written: ")])
    if path is not None:
        print(path)
    return code


def _serve(args: argparse.Namespace) -> int:
    from jobs.serve import serve

    for out in args.output_dirs:
        if not (Path(out) / "manifest").is_dir():
            print(f"reeltag serve: {out}: not a reeltag output directory (no manifest/)", file=sys.stderr)
            return 2
    code, _ = _guarded(lambda: serve(args.output_dirs, host=args.host, port=args.port, token=args.token), [
        ((SearchError,), 2, "reeltag serve: "),
        ((OSError,), 1, "reeltag serve: cannot listen: ")])
    return code


def _train_or_eval(command: str, spec: PipelineSpec, *, restart: bool = False) -> int:
    code, result = _guarded(lambda: run_train(spec, restart=restart) if command == "train" else run_eval(spec), [
        ((ManifestError, TrainError, CheckpointError), 2, f"reeltag {command}: "),
        ((ModelLoadError,), 1, f"reeltag {command}: the job could not run: ")])
    if result is None:
        return code
    if command == "train":
        what = "head" if result.get("backbone", "frozen") == "frozen" else "model and head"
        use = "" if what == "head" else f"--set model.pretrained={result['checkpoint']} "
        print(f"reeltag train: {result['clips']} clips, {result['epochs']} epochs in {result['seconds']} s; "
              f"{what} saved to {result['checkpoint']}\n  use it with: {use}--set temporal.pooling=attention "
              f"--set temporal.checkpoint={result['checkpoint']}")
        print("training clips:\n" + format_metrics(result["train"]))
        if "eval" in result:
            print("held-out clips:\n" + format_metrics(result["eval"]))
    else:
        print(f"reeltag eval ({result['pooling']} pooling):\n" + format_metrics(result) +
              f"\n  written to {spec.output.dir}/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
