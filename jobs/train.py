"""``reeltag train`` and ``reeltag eval``: the temporal head on labelled clips, with a frozen backbone whose
frame embeddings are computed once per manifest and cached under ``output.dir/cache``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelSpec, PipelineSpec, TowerSpec
from pipeline.manifest import LabelledClip, read_manifest


class TrainError(RuntimeError):
    """Training or evaluation could not run (no manifest, no usable clip)."""


def _encoder(spec: PipelineSpec, tower: TowerSpec | None = None):
    """The encoder (loaded once per process: train embeds frames and texts, maybe of two manifests) and a tower
    over it (``spec.tower`` unless given)."""
    from encoders import HierarchicalTower

    m, t = spec.model, tower or spec.tower
    encoder = _load_encoder(m)
    return encoder, HierarchicalTower(encoder, levels=t.levels, fusion=t.fusion, batch_size=m.batch_size,
                                      fine_frames=t.fine_frames, overlap=t.tile_overlap)


@functools.lru_cache(maxsize=2)
def _load_encoder(m: ModelSpec):
    from encoders import create_encoder

    return create_encoder(m.family, pretrained=m.pretrained, local_files_only=m.local_files_only, dtype=m.dtype,
                          device=m.device)


def _cache_key(spec: PipelineSpec, clips: list[LabelledClip], kind: str, short_side: int, detail: str) -> str:
    files = {c.uri: (os.path.getsize(c.uri), os.path.getmtime(c.uri)) if os.path.exists(c.uri) else None
             for c in clips}
    parts = [[(c.uri, c.start_s, c.end_s) for c in clips], sorted(files.items()), spec.sampling.frames, short_side,
             spec.decode.backend, kind, detail]
    if kind != "pixels":  # embeddings depend on the model; pixels only on its preprocessing (short_side, detail)
        parts += [spec.model_id(), str(spec.tower), spec.model.dtype]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _per_clip(spec: PipelineSpec, clips: list[LabelledClip], kind: str, short_side: int, transform, *,
              detail: str = "", log):
    """``transform(uint8 [T,H,W,3]) -> [T,...]`` of each clip's sampled frames, stacked ``[N,T,...]``, with
    the frames' times ``[N,T]`` and which clips decoded; cached on disk under ``output.dir/cache``."""
    from safetensors.torch import load_file, save_file

    from pipeline.decode import DecodeError, decode_span

    path = Path(spec.output.dir) / "cache" / f"{kind}-{_cache_key(spec, clips, kind, short_side, detail)}.safetensors"
    if path.exists():
        cached = load_file(path)
        return cached[kind], cached["times"], cached["ok"].bool()
    torch.set_num_threads(os.cpu_count() or 1)
    t, values, times, ok = spec.sampling.frames, [], [], []
    started = time.monotonic()
    for i, clip in enumerate(clips):
        try:
            pixels, stamps = decode_span(clip.uri, clip.start_s, clip.end_s, t, short_side,
                                         backend=spec.decode.backend)
            with torch.inference_mode():
                values.append(transform(torch.from_numpy(pixels)))
            times.append(torch.as_tensor(stamps, dtype=torch.float32))
            ok.append(True)
        except DecodeError as e:
            log({"skipped": clip.uri, "error_type": e.error_type, "message": str(e)})
            values.append(None)
            times.append(torch.zeros(t))
            ok.append(False)
        if (i + 1) % 500 == 0:
            log({f"{kind}_clips": i + 1, "of": len(clips), "seconds": round(time.monotonic() - started, 1)})
    like = next((v for v in values if v is not None), None)
    if like is None:
        raise TrainError("no clip of the manifest could be decoded")
    stacked = torch.stack([v if v is not None else torch.zeros_like(like) for v in values])
    result = {kind: stacked.contiguous(), "times": torch.stack(times), "ok": torch.tensor(ok, dtype=torch.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(result, path.with_name(f".{path.name}.tmp"))
    os.replace(path.with_name(f".{path.name}.tmp"), path)
    return result[kind], result["times"], result["ok"].bool()


def frame_embeddings(spec: PipelineSpec, clips: list[LabelledClip], *, log=print):
    """``[N,T,D]`` fused frame embeddings (float32), times ``[N,T]``, and which clips decoded; cached. With
    ``tower.fusion: attention`` (trained with the head) every view instead: ``[N,T,V,D]``, the whole frame first,
    for all frames whatever ``tower.fine_frames`` says (the fusion treats each frame on its own)."""
    from .run import decode_short_side

    if spec.tower.fusion == "attention":
        tower = _encoder(spec, replace(spec.tower, fine_frames="all"))[1]
        return _per_clip(spec, clips, "views", decode_short_side(spec), lambda x: tower(x)[1].float(), log=log)
    tower = _encoder(spec)[1]
    return _per_clip(spec, clips, "frames", decode_short_side(spec), lambda x: tower(x)[0].float(), log=log)


def frame_pixels(spec: PipelineSpec, clips: list[LabelledClip], cfg, *, log=print):
    """``[N,T,3,R,R]`` uint8: each sampled frame as the backbone sees it (the checkpoint's resize and crop, before
    normalisation), times ``[N,T]``, and which clips decoded; cached. What end-to-end training reads."""
    from encoders.preprocess import resize_crop

    return _per_clip(spec, clips, "pixels", cfg.level1_side, lambda x: resize_crop(x, cfg).to(torch.uint8),
                     detail=f"{cfg.size} {cfg.crop}", log=log)


def text_embeddings(spec: PipelineSpec, clips: list[LabelledClip]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique texts, their embeddings ``[Q,D]`` (labels prompt-ensembled, captions as written), group per clip."""
    from encoders import Vocabulary, label_embeddings

    texts = list(dict.fromkeys(c.text for c in clips))
    is_label = {c.text: c.is_label for c in clips}
    encoder = _encoder(spec)[0]
    emb = []
    for text in texts:
        if is_label[text]:
            emb.append(label_embeddings(encoder, Vocabulary((text,)), spec.tags.prompts)[0])
        else:
            emb.append(F.normalize(encoder.encode_text([text]), dim=-1)[0])
    index = {text: i for i, text in enumerate(texts)}
    groups = torch.tensor([index[c.text] for c in clips])
    return texts, torch.stack(emb).float(), groups


def load_clips(spec: PipelineSpec, manifest: str, *, log=print):
    from temporal.train import ClipEmbeddings

    clips = read_manifest(manifest)
    frames, times, ok = frame_embeddings(spec, clips, log=log)
    texts, text_emb, groups = text_embeddings(spec, clips)
    keep = ok.nonzero().flatten()
    views = frames[keep] if frames.ndim == 4 else None
    data = ClipEmbeddings(frames[keep] if views is None else views[:, :, 0], times[keep],
                          torch.ones(len(keep), frames.shape[1], dtype=torch.bool), text_emb[groups[keep]],
                          groups[keep], views, None if views is None else torch.tensor(spec.tower.view_levels))
    return data, texts, text_emb


def _fusion(spec: PipelineSpec, dim: int):
    """The tower's view fusion to train with the head (``tower.fusion: attention``), else None."""
    from encoders.tower import ViewAttention

    return ViewAttention(dim) if spec.tower.fusion == "attention" else None


def evaluate(head, data, texts: list[str], text_emb: torch.Tensor) -> dict:
    """Text->video R@1/5/10 and median rank (one query per distinct text), zero-shot top-1, tag mAP."""
    from temporal.metrics import mean_average_precision, retrieval, top1
    from temporal.train import embed_clips

    video = embed_clips(head, data).numpy()
    text = text_emb.numpy()
    groups = data.groups.numpy()
    present = np.unique(groups)
    relevant = groups[None, :] == present[:, None]
    scores = video @ text.T
    out = retrieval(video, text[present], relevant)
    out["top1"] = top1(scores, groups)
    out["mAP"] = mean_average_precision(scores, groups[:, None] == np.arange(len(texts))[None, :])
    out["clips"], out["queries"] = int(len(groups)), int(len(present))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _log_to(path: Path):
    def log(record: dict) -> None:
        line = json.dumps(record)
        print(line, file=sys.stderr, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def run_train(spec: PipelineSpec) -> dict:
    from temporal.train import HeadShape, fit

    if not spec.train.manifest:
        raise TrainError("train.manifest is not set: point it at a .jsonl/.csv of labelled clips")
    out = Path(spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    log = _log_to(out / "train_log.jsonl")
    torch.manual_seed(spec.train.seed)
    if spec.train.backbone != "frozen":
        return _run_train_model(spec, out, log)
    data, texts, text_emb = load_clips(spec, spec.train.manifest, log=log)
    held_out = load_clips(spec, spec.train.eval_manifest, log=log) if spec.train.eval_manifest else None
    tr, settings = spec.train, _settings(spec)
    shape = HeadShape(dim=data.frames.shape[-1], heads=tr.heads, layers=tr.layers)
    fuse = _fusion(spec, shape.dim)  # trained with the head and saved in its checkpoint
    started = time.monotonic()

    def validate(head) -> dict:
        clips, clip_texts, clip_text_emb = held_out
        return {"val_" + k: v for k, v in evaluate(head, clips.fused(fuse), clip_texts, clip_text_emb).items()
                if k in ("R@1", "top1")}

    head = fit(data, shape, settings, checkpoint_dir=out / "head", log=log, fuse=fuse,
               evaluate=validate if held_out else None)
    summary = {"clips": len(data.frames), "texts": len(texts), "epochs": tr.epochs,
               "seconds": round(time.monotonic() - started, 1), "checkpoint": str(out / "head"),
               "train": evaluate(head, data.fused(fuse), texts, text_emb)}
    if held_out:
        summary["eval"] = evaluate(head, held_out[0].fused(fuse), *held_out[1:])
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _settings(spec: PipelineSpec):
    from temporal.train import TrainSettings

    tr = spec.train
    return TrainSettings(loss=tr.loss, epochs=tr.epochs, batch_size=tr.batch_size, lr=tr.lr,
                         weight_decay=tr.weight_decay, seed=tr.seed, max_shift=tr.max_shift,
                         mean_loss=tr.mean_loss)


def _pixel_clips(spec: PipelineSpec, manifest: str, cfg, *, log):
    """Decoded clips of a manifest for end-to-end training: ClipPixels and their distinct texts (captions as
    written; labels in the first prompt template)."""
    from temporal.train import ClipPixels

    clips = read_manifest(manifest)
    pixels, times, ok = frame_pixels(spec, clips, cfg, log=log)
    text_of = [c.text if not c.is_label else spec.tags.prompts[0].format(c.text) for c in clips]
    index = {t: i for i, t in enumerate(dict.fromkeys(text_of))}
    texts, keep = list(index), ok.nonzero().flatten()
    groups = torch.tensor([index[t] for t in text_of])
    return ClipPixels(pixels[keep], times[keep], torch.ones(len(keep), pixels.shape[1], dtype=torch.bool),
                      groups[keep]), texts


def _pixel_metrics(encoder, head, data, texts: list[str]) -> dict:
    from temporal.train import ClipEmbeddings

    embedded = ClipEmbeddings(data.frame_embeddings(encoder), data.times_s, data.mask, None, data.groups)
    return evaluate(head, embedded, texts, F.normalize(encoder.encode_text(texts), dim=-1))


def _run_train_model(spec: PipelineSpec, out: Path, log) -> dict:
    """``train.backbone: finetune|scratch``: the whole model and the head, end to end, into ``output.dir/model``
    (a ``save_pretrained`` directory plus the head: both ``model.pretrained`` and ``temporal.checkpoint``)."""
    from encoders import create_encoder
    from temporal.train import META_FILE, HeadShape, fit_model, recover_checkpoint

    tr, m = spec.train, spec.model
    if spec.tower.levels != (1,):
        raise TrainError(f"train.backbone: {tr.backbone} trains on the whole frame only: set tower.levels: [1] "
                         "(tiles and their fusion train with train.backbone: frozen)")
    checkpoint = recover_checkpoint(out / "model")
    resume = (checkpoint / META_FILE).exists()
    # training runs in float32 whatever model.dtype says (bf16 weights do not train well)
    encoder = create_encoder(m.family, pretrained=str(checkpoint) if resume else m.pretrained,
                             local_files_only=m.local_files_only or resume, dtype="float32", device="cpu",
                             scratch=tr.backbone == "scratch" and not resume)
    torch.set_num_threads(os.cpu_count() or 1)
    data, texts = _pixel_clips(spec, tr.manifest, encoder.preprocess_cfg, log=log)
    held_out = _pixel_clips(spec, tr.eval_manifest, encoder.preprocess_cfg, log=log) if tr.eval_manifest else None
    shape = HeadShape(dim=encoder.embed_dim, heads=tr.heads, layers=tr.layers)
    started = time.monotonic()
    head = fit_model(encoder, data, texts, shape, _settings(spec), checkpoint_dir=checkpoint, log=log,
                     evaluate=(lambda enc, h: {"val_" + k: v for k, v in _pixel_metrics(enc, h, *held_out).items()
                                               if k in ("R@1", "top1")}) if held_out else None)
    sample = torch.randperm(len(data.pixels), generator=torch.Generator().manual_seed(0))[:1000]
    summary = {"clips": len(data.pixels), "texts": len(texts), "epochs": tr.epochs, "backbone": tr.backbone,
               "seconds": round(time.monotonic() - started, 1), "checkpoint": str(checkpoint),
               "train": _pixel_metrics(encoder, head, data.subset(sample), texts)}  # 1,000 clips: a check, not a cost
    if held_out:
        summary["eval"] = _pixel_metrics(encoder, head, *held_out)
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_eval(spec: PipelineSpec) -> dict:
    from temporal.train import load_checkpoint, load_fusion

    if not spec.train.eval_manifest:
        raise TrainError("train.eval_manifest is not set: point it at a .jsonl/.csv of held-out labelled clips")
    data, texts, text_emb = load_clips(spec, spec.train.eval_manifest, log=lambda r: None)
    head = load_checkpoint(spec.temporal.checkpoint)[0] if spec.temporal.checkpoint else None
    fuse = _fusion(spec, data.frames.shape[-1])
    if fuse is not None:
        load_fusion(spec.temporal.checkpoint, fuse)
    result = {"pooling": spec.temporal.pooling if head is not None else "mean",
              **evaluate(head, data.fused(fuse), texts, text_emb)}
    out = Path(spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_metrics(result: dict) -> str:
    keys = ["clips", "queries", "R@1", "R@5", "R@10", "median_rank", "top1", "mAP"]
    return "\n".join(f"  {k:<12} {result[k]}" for k in keys if k in result)
