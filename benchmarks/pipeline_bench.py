"""End-to-end throughput and memory against stage-alone references measured in the same run (run by hand).

    python benchmarks/pipeline_bench.py [--videos 8] [--seconds 20] [--skip-rss] [--dtype auto|float32|bfloat16|int8]

(a) decode alone and (b) the encoder alone on frames already in memory, each on one core, in segments/s;
(c) ``reeltag run`` end to end on the embedded Ray with one decode task and one encoder actor (one thread each)
on this 2-core machine. Target: (c) >= 80% of min(a, b), i.e. decode, Ray and writing overlap, not add up.
Model: CLIP ViT-B/32 (real architecture, random weights, saved and loaded with save_pretrained), 8 frames per
4 s window, 480p and 720p H.264 inputs made with the ffmpeg CLI. Then peak RSS of all reeltag and Ray processes
over a 200-video run against a 20-video run (search: benchmarks/search_scale.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import parse_spec  # noqa: E402
from pipeline.stages import DecodeStage, EncodeStage  # noqa: E402


def make_videos(root: Path, n: int, seconds: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = "854x480" if i % 2 == 0 else "1280x720"
        path = root / f"v{i:03d}_{size}_{seconds}s.mp4"
        if not path.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25",
                            "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-g", "50",
                            "-pix_fmt", "yuv420p", str(path)], check=True)
        paths.append(str(path))
    return paths


def b32(root: Path) -> Path:
    """A CLIP ViT-B/32 with random weights and a small vocabulary, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from encoders._tiny import _clip_bpe_files

    path = root / "clip-b32-random"
    if not (path / "config.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer(*map(str, _clip_bpe_files(("person", "running", "car"), Path(tmp))))
        config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                             bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
        CLIPModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def pipeline_yaml(inputs, model: Path, out: Path, vocab: Path, dtype: str = "auto") -> str:
    return (f"input: {{paths: {json.dumps(inputs)}}}\nsegments: {{window_s: 4.0}}\nsampling: {{frames: 8}}\n"
            f"model: {{pretrained: '{model}', dtype: {dtype}}}\ntags: {{vocabulary: '{vocab}'}}\n"
            f"output: {{dir: '{out}'}}\nray: {{num_cpus: 2, threads_per_actor: 1}}\n")


def process_tree_rss(root_pid: int) -> int:
    """KiB of RSS of ``root_pid`` and all its descendants (Ray's processes are children of the driver)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines()]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(ppid, []).append(pid)
    rss = {pid: r for pid, _, r in rows}
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def peak_rss_of_run(config_args: list[str]) -> tuple[int, float]:
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *config_args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    peak, started = 0, time.monotonic()
    while job.poll() is None:
        peak = max(peak, process_tree_rss(job.pid))
        time.sleep(0.25)
    assert job.returncode == 0, job.stderr
    return peak, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto: int8 on x86 CPUs)")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "reeltag-pipeline-bench"))
    args = parser.parse_args()
    import torch

    work = Path(args.dir)
    videos = make_videos(work / "videos", args.videos, args.seconds)
    model = b32(work)
    vocab = work / "vocab.txt"
    vocab.write_text("a person running\na car\n")
    spec = parse_spec(pipeline_yaml(videos, model, work / "out", vocab, args.dtype))

    torch.set_num_threads(1)
    decode = DecodeStage(spec, short_side=224)
    decode.setup()
    list(decode({"uri": videos[0]}))  # warm the decoder process
    started = time.perf_counter()
    rows = [r for v in videos for r in decode({"uri": v}) if r["kind"] == "segment"]
    t_decode = time.perf_counter() - started
    encode = EncodeStage(spec)
    encode.setup()
    size = encode.batch_size  # segments per call, as run.py hands them to the stage
    batch = {k: np.array([r[k] for r in rows[:size]] + [None], dtype=object)[:-1] for k in rows[0]}
    encode(batch)  # warm-up
    started = time.perf_counter()
    for first in range(0, len(rows), size):
        part = rows[first:first + size]
        encode({k: np.array([r[k] for r in part] + [None], dtype=object)[:-1] for k in part[0]})
    t_encode = time.perf_counter() - started
    n = len(rows)
    del rows

    import shutil

    def run_job(inputs: list[str]) -> tuple[float, dict]:
        shutil.rmtree(work / "out", ignore_errors=True)
        config = work / "pipeline.yaml"
        config.write_text(pipeline_yaml(inputs, model, work / "out", vocab, args.dtype))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(config)], check=True, capture_output=True)
        return time.perf_counter() - started, json.loads((work / "out" / "run.json").read_text())

    # Start-up (Ray, the actor loading the model) costs the same for any archive: the archive runs at the
    # marginal rate, measured as the difference between a run over half the videos and a run over all of them.
    t_half, half = run_job(videos[: len(videos) // 2])
    t_all, full = run_job(videos)
    a, b = n / t_decode, n / t_encode
    c = (full["segments"] - half["segments"]) / (t_all - t_half)
    print(f"{n} segments of 8 frames from {len(videos)} videos ({args.seconds} s, 480p and 720p H.264), "
          f"CLIP B/32 ({full['model'].split('/')[-1]}), dtype {args.dtype}")
    print(f"(a) decode alone, 1 core:        {a:6.2f} segments/s")
    print(f"(b) encoder alone, 1 thread:     {b:6.2f} segments/s")
    print(f"(c) reeltag run, embedded Ray:   {c:6.2f} segments/s marginal ({full['segments'] / t_all:.2f} over the "
          f"whole {t_all:.0f} s run, Ray start-up and model loading included)")
    print(f"(c) / min(a, b) = {c / min(a, b):.2f} (target >= 0.80)")

    if not args.skip_rss:
        from encoders._tiny import save_tiny
        from pipeline.synth import Clip, render, write_video

        small = work / "small"
        small.mkdir(exist_ok=True)
        for i in range(200):
            if not (small / f"s{i:03d}.mp4").exists():
                write_video(small / f"s{i:03d}.mp4", render(Clip("red", "circle", "moving left", width=160,
                                                                    height=96, duration_s=2.0, seed=i)))
        tiny = save_tiny(work / "tiny")
        peaks = {}
        for count in (20, 200):
            out = work / f"rss-{count}"
            shutil.rmtree(out, ignore_errors=True)
            files = [str(small / f"s{i:03d}.mp4") for i in range(count)]
            listing = work / f"list-{count}.txt"
            listing.write_text("\n".join(files) + "\n")
            cfg = work / f"rss-{count}.yaml"
            cfg.write_text(f"input: {{manifest: '{listing}'}}\nmodel: {{pretrained: '{tiny}'}}\n"
                           f"output: {{dir: '{out}', shard_rows: 64}}\nray: {{num_cpus: 2}}\n")
            peaks[count], seconds = peak_rss_of_run([str(cfg)])
            print(f"peak RSS of the driver and all Ray processes, {count} videos: {peaks[count] / 1024:.0f} MiB "
                  f"({seconds:.0f} s)")
        print(f"200-video peak / 20-video peak = {peaks[200] / peaks[20]:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
