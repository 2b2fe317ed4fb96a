"""Encode-stage images/s against the bare backbone at the same batch size, measured in the same run (by hand).

    python benchmarks/encode_batching.py [--batch 16] [--dtype auto] [--device cpu] [--segments 48]

The model is CLIP ViT-B/32 at 224 (the real architecture, random weights, saved with ``save_pretrained`` and
loaded through ``create_model``: nothing to download). The stage gets 8-frame segments decoded at 224 x 298 and
does everything it does in a run: preprocessing, the tower, temporal pooling, tagging against a 400-label
vocabulary, building the Arrow table. The reference is ``forward_features`` on already preprocessed
``[batch, 3, 224, 224]`` pixels. Rounds alternate between the two, and the ratio is the median of the rounds'
ratios (these machines are shared and noisy). On a GPU: ``--device cuda --batch 256 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoders._tiny import save_tiny  # noqa: E402
from encoders.preprocess import preprocess  # noqa: E402
from pipeline.config import parse_spec  # noqa: E402
from pipeline.stages import EncodeStage  # noqa: E402

VIT_B32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4, embed_dim=512)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _segment_rows(n: int, frames: int, rng: np.random.Generator) -> list[dict]:
    return [{"kind": "segment", "video_id": f"v{i}", "uri": f"v{i}.mp4", "segment_id": 0, "n_segments": 0,
             "start_s": 0.0, "end_s": 4.0, "frame_times_s": np.linspace(0.25, 3.75, frames),
             "frames": rng.integers(0, 256, (frames, 224, 298, 3), dtype=np.uint8), "backend": "", "node": "",
             "stage": "", "error_type": "", "message": ""} for i in range(n)]


def _batch(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16, help="model.batch_size: images per backbone call")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--segments", type=int, default=48, help="8-frame segments per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny(Path(tmp) / "vit-b32", words=("run", "jump"), **VIT_B32)
        vocab = Path(tmp) / "labels.txt"
        vocab.write_text("\n".join(f"label {i}" for i in range(400)) + "\n")
        spec = parse_spec(f"input: {{paths: ['{tmp}']}}\nsampling: {{frames: 8}}\n"
                          f"model: {{pretrained: '{model_dir}', dtype: {args.dtype}, device: {args.device}, "
                          f"batch_size: {args.batch}}}\ntags: {{vocabulary: '{vocab}'}}\noutput: {{dir: '{tmp}/out'}}\n"
                          f"ray: {{threads_per_actor: {args.threads}}}\n")
        stage = EncodeStage(spec)
        stage.setup()
        encoder = stage.model.encoder
        rng = np.random.default_rng(0)
        rows = _segment_rows(args.segments, 8, rng)
        images = args.segments * 8
        pixels = preprocess(torch.from_numpy(rows[0]["frames"]), encoder.preprocess_cfg)
        reference = pixels.repeat(args.batch // 8 + 1, 1, 1, 1)[:args.batch].to(encoder.device)

        def run_stage() -> float:
            started = time.perf_counter()
            for first in range(0, len(rows), stage.batch_size):
                stage(_batch(rows[first:first + stage.batch_size]))
            return images / (time.perf_counter() - started)

        def run_bare() -> float:
            started = time.perf_counter()
            for _ in range(images // args.batch):
                encoder.forward_features(reference)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return images // args.batch * args.batch / (time.perf_counter() - started)

        run_stage(), run_bare()  # warm-up
        stage_rates, bare_rates = [], []
        for _ in range(args.rounds):
            stage_rates.append(run_stage())
            bare_rates.append(run_bare())
        ratios = [s / b for s, b in zip(stage_rates, bare_rates)]
    print(f"CPU: {cpu_name()}, {args.threads} threads; device {args.device}, dtype {encoder.dtype}, "
          f"batch {args.batch} images, {stage.batch_size} segments per stage call, {args.segments} segments a round")
    print(f"bare model     {statistics.median(bare_rates):8.1f} images/s  (rounds: "
          f"{', '.join(f'{r:.1f}' for r in bare_rates)})")
    print(f"encode stage   {statistics.median(stage_rates):8.1f} images/s  (rounds: "
          f"{', '.join(f'{r:.1f}' for r in stage_rates)})")
    print(f"stage / bare   {statistics.median(ratios):8.3f}  (median of rounds; min {min(ratios):.3f})")


if __name__ == "__main__":
    main()
