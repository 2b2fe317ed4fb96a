"""Encoder throughput against the same-dtype torch.mm peak measured in the same run (run by hand).

    python benchmarks/encoder_bench.py [--images 48] [--families-only]

Every family's base architecture (random weights, nothing to download) at 1 thread: images/s in fp32, bf16 and
int8 (``model.dtype: int8``, the image side quantised) and each as a fraction of the same-dtype matmul peak
(int8: ``torch._int_mm``), next to CLIP B/32. Then, for B/32 alone:

CLIP ViT-B/32 at 224 (the real architecture, random weights: nothing to download): images/s and achieved
GFLOP/s as a fraction of the measured ``torch.mm`` peak of the same dtype and thread count, at batch 1/8/32 and
1/2 threads, for fp32 and bf16 (``model.dtype: auto`` picks bf16 on CPUs with AVX512_BF16 or AMX); text
prompts/s; and the hierarchical tower's cost on an 8-frame segment for levels [1], [1,2] and [1,2] with
``fine_frames: middle`` relative to [1].
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoders import ClipEncoder, HierarchicalTower  # noqa: E402
from encoders.models import resolve_dtype  # noqa: E402


def mm_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of a square matmul, the best of at least three timed runs. Where one matmul of side ``n`` outlasts a
    quarter of ``seconds`` (bf16 without native support: AVX2-only CPUs emulate it) the side is halved first, so
    the peak is measured on every CPU (it stayed 0, and the report divided by it, on an AMD Zen 3)."""
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        torch.mm(a, b)  # warm-up
        if time.perf_counter() - t < seconds / 4 or n <= 256:
            break
        n //= 2
    return _best_rate(lambda: torch.mm(a, b), 2 * n ** 3, seconds)


def int8_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """GOP/s of a square int8 matmul (``torch._int_mm``, what dynamic quantisation's linear layers run on)."""
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    torch._int_mm(a, a)  # warm-up
    return _best_rate(lambda: torch._int_mm(a, a), 2 * n ** 3, seconds)


def _best_rate(fn, ops: int, seconds: float) -> float:
    """G(FL)OP/s of ``fn`` (``ops`` operations a call): the best of at least three calls, timed for ``seconds``."""
    best, runs, end = 0.0, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = max(best, ops / (time.perf_counter() - t) / 1e9)
        runs += 1
    return best


def image_flops(model, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.get_image_features(pixel_values=torch.randn(batch, 3, 224, 224, dtype=model.dtype))
    return counter.get_total_flops()


def base_families():
    """(name, checkpoint it stands for, model, images per call, a function of the model running one call)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        MetaClip2Config,
        MetaClip2Model,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Siglip2Config,
        Siglip2Model,
        SiglipConfig,
        SiglipModel,
        XCLIPConfig,
        XCLIPModel,
    )

    from encoders.models import naflex_patches

    x224, x960 = torch.randn(8, 3, 224, 224), torch.randn(1, 3, 960, 960)
    naflex = naflex_patches(torch.randn(8, 3, 256, 256), 16, 256)
    owl_ids = torch.randint(0, 1000, (4, 16))
    yield ("clip", "openai/clip-vit-base-patch32", CLIPModel(CLIPConfig()), 8,
           lambda m, x=x224: m.get_image_features(pixel_values=x.to(_dtype(m))))
    yield ("siglip", "google/siglip2-base-patch16-224", SiglipModel(SiglipConfig()), 8,
           lambda m, x=x224: m.get_image_features(pixel_values=x.to(_dtype(m))))
    yield ("siglip2 naflex", "google/siglip2-base-patch16-naflex", Siglip2Model(Siglip2Config()), 8,
           lambda m, x=naflex: m.get_image_features(pixel_values=x[0].to(_dtype(m)), pixel_attention_mask=x[1],
                                                    spatial_shapes=x[2]))
    yield ("metaclip2", "facebook/metaclip-2-worldwide-b16 (CLIP vocab)",
           MetaClip2Model(MetaClip2Config(vision_config={"patch_size": 16})), 8,
           lambda m, x=x224: m.get_image_features(pixel_values=x.to(_dtype(m))))
    yield ("xclip", "microsoft/xclip-base-patch32 (8 frames)", XCLIPModel(XCLIPConfig()), 8,
           lambda m, x=x224: m.get_video_features(pixel_values=x[None].to(_dtype(m))))
    yield ("owlv2", "google/owlv2-base-patch16-ensemble (960 px)",
           Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960})), 1,
           lambda m, x=x960: m(input_ids=owl_ids, pixel_values=x.to(_dtype(m))))


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def family_table(images: int) -> None:
    """Each family's base architecture at 1 thread in fp32, bf16 and int8 (the image side, as model.dtype: int8)."""
    from torch.utils.flop_counter import FlopCounterMode

    from encoders.models import quantize_int8

    torch.set_num_threads(1)
    peaks = {"fp32": mm_peak(torch.float32), "bf16": mm_peak(torch.bfloat16), "int8": int8_peak()}
    print("matmul peak, 1 thread: " + ", ".join(f"{k} {v:.0f} G/s" for k, v in peaks.items()))
    print(f"{'family':<15} {'stands for':<46} {'MB fp32':>7} " + " ".join(f"{d + ' img/s':>10} {'peak':>5}"
                                                                     for d in peaks) + f" {'int8/fp32':>9}")
    for name, checkpoint, model, batch, call in base_families():
        model = model.eval()
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            call(model)
        per_image = counter.get_total_flops() / batch
        megabytes = sum(p.numel() * 4 for p in model.parameters()) / 2 ** 20
        rates = {}
        for dtype in peaks:
            variant = (quantize_int8(model) if dtype == "int8" else
                       model.to(torch.bfloat16) if dtype == "bf16" else model.to(torch.float32))
            with torch.inference_mode():
                rates[dtype] = batch / timed(lambda v=variant, c=call: c(v), max(1, min(images // batch // 4, 3)))
            model = model.to(torch.float32)
        print(f"{name:<15} {checkpoint:<46} {megabytes:7.0f} " +
              " ".join(f"{rates[d]:10.2f} {rates[d] * per_image / 1e9 / peaks[d]:5.0%}" for d in peaks) +
              f" {rates['int8'] / rates['fp32']:8.2f}x")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN picks kernels on first use)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per measurement")
    parser.add_argument("--families-only", action="store_true", help="only the per-family table")
    args = parser.parse_args()
    family_table(args.images)
    if args.families_only:
        return
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from encoders._tiny import _clip_bpe_files

    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig()).eval()  # ViT-B/32 at 224, text 12 x 512
    auto_name = resolve_dtype("auto", torch.device("cpu"))
    auto = torch.float32 if auto_name == "float32" else torch.bfloat16  # int8 is in the table above
    print(f"dtype auto on this CPU: {auto_name}; torch {torch.__version__}; below, {auto} for the float rows")
    print(f"{'dtype':<9} {'thr':>3} {'batch':>5} {'img/s':>7} {'GFLOP/s':>8} {'mm peak':>8} {'of peak':>7}")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        per_image = image_flops(model, 1)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            peak = mm_peak(dtype)
            for batch in (1, 8, 32):
                pixels = torch.randn(batch, 3, 224, 224, dtype=dtype)
                repeats = max(1, args.images // batch)
                with torch.inference_mode():
                    sec = timed(lambda m=model, p=pixels: m.get_image_features(pixel_values=p), repeats)
                rate = batch / sec
                achieved = rate * per_image / 1e9
                results[(dtype, threads, batch)] = achieved / peak
                print(f"{str(dtype).split('.')[-1]:<9} {threads:>3} {batch:>5} {rate:7.1f} {achieved:8.0f} "
                      f"{peak:8.0f} {achieved / peak:7.0%}")
    print(f"target: backbone at batch 8 with the auto dtype >= 70% of that dtype's mm peak: "
          f"{results[(auto, 1, 8)]:.0%} (1 thread), {results[(auto, 2, 8)]:.0%} (2 threads)")

    torch.set_num_threads(1)
    model = base.to(auto)
    with __import__("tempfile").TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*map(str, _clip_bpe_files(("person", "opening", "car", "door"), Path(tmp))))
    processor = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                 "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    encoder = ClipEncoder(model, tokenizer, processor, name="bench-b32")
    prompts = [f"a video of a person opening a car door number {i}" for i in range(64)]
    sec = timed(lambda: encoder.encode_text(prompts), 3)
    print(f"text: {len(prompts) / sec:.0f} prompts/s (batch 64, 1 thread, {auto})")

    frames = torch.randint(0, 256, (8, 224, 398, 3), dtype=torch.uint8)  # an 8-frame 16:9 segment
    costs = {}
    for name, kwargs in (("[1]", dict(levels=(1,))), ("[1,2]", dict(levels=(1, 2), fusion="mean")),
                         ("[1,2] middle", dict(levels=(1, 2), fusion="mean", fine_frames="middle"))):
        tower = HierarchicalTower(encoder, batch_size=8, **kwargs)
        with torch.inference_mode():
            costs[name] = timed(lambda t=tower: t(frames), 2)
    print("tower on an 8-frame segment: " + ", ".join(f"{k} {v:.2f} s ({v / costs['[1]']:.2f}x)"
                                                      for k, v in costs.items()))


if __name__ == "__main__":
    main()
