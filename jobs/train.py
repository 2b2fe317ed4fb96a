"""``reeltag train`` and ``reeltag eval``: labelled clips decoded once and cached under ``output.dir/cache``, then
the one training loop (:func:`temporal.train.fit`) with the task ``train.backbone`` names: the temporal head (and
view fusion) on frozen frame embeddings, or the whole model end to end from pixels."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from encoders.models import ImageTextEncoder, cpu_has_bf16
from encoders.preprocess import PreprocessCfg, resize_crop
from encoders.text import Vocabulary
from encoders.video_text import VideoTextModel, create_model, decode_short_side
from pipeline.config import PipelineSpec
from pipeline.decode import DecodeError, decode_span
from pipeline.manifest import LabelledClip, read_manifest
from temporal.checkpoint import META_FILE, HeadShape, load_checkpoint, recover_checkpoint
from temporal.files import atomic_path, write_text_atomic
from temporal.metrics import mean_average_precision, retrieval, top1
from temporal.pooling import AttentionPooling
from temporal.train import ClipEmbeddings, ClipPixels, HeadTask, ModelTask, check_same_job, embed_clips, fit, job_of

Log = Callable[[dict], None]
Cached = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # values [N,T,...], times [N,T], which clips decoded [N]


class TrainError(RuntimeError):
    """Training or evaluation could not run (no manifest, no usable clip)."""


def _cache_key(spec: PipelineSpec, clips: list[LabelledClip], kind: str, short_side: int, detail: str) -> str:
    files = {c.uri: (os.path.getsize(c.uri), os.path.getmtime(c.uri)) if os.path.exists(c.uri) else None
             for c in clips}
    parts = [[(c.uri, c.start_s, c.end_s) for c in clips], sorted(files.items()), spec.sampling.frames, short_side,
             spec.decode.backend, kind, detail]
    if kind != "pixels":  # embeddings depend on the model (detail: the dtype it runs in); pixels only on its
        parts += [spec.model_id(), str(spec.tower), _weights_stamp(spec.model.pretrained)]  # preprocessing
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _weights_stamp(pretrained: str) -> list | None:
    """Size and time of each file of a local checkpoint: a model retrained in place (`make demo-model` copies the
    new one over the old) must not meet the embeddings of the one before. None for a hub id."""
    directory = Path(pretrained)
    if not directory.is_dir():
        return None
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file())


def _decode_clips(spec: PipelineSpec, clips: list[LabelledClip], kind: str, short_side: int,
                  transform: Callable[[torch.Tensor], torch.Tensor], log: Log) -> dict[str, torch.Tensor]:
    """``transform(uint8 [T,H,W,3]) -> [T,...]`` of each clip's sampled frames, stacked ``[N,T,...]`` (zeros for a
    clip that does not decode), the frames' times ``[N,T]`` and which clips decoded (``ok``). Clips decode in a
    thread per core, ``transform`` runs here, in clip order. PyAV (what ``auto`` reads a few frames a clip with)
    decodes outside the GIL: 2.1x on 2 cores; Decord holds it (1.1x)."""
    t, values, times, ok = spec.sampling.frames, [], [], []
    started = time.monotonic()

    def decode(clip: LabelledClip) -> tuple[np.ndarray, np.ndarray] | DecodeError:
        try:
            return decode_span(clip.uri, clip.start_s, clip.end_s, t, short_side, backend=spec.decode.backend)
        except DecodeError as e:
            return e

    for i, (clip, decoded) in enumerate(zip(clips, _ahead(decode, clips, os.cpu_count() or 1))):
        if isinstance(decoded, DecodeError):
            log({"skipped": clip.uri, "error_type": decoded.error_type, "message": str(decoded)})
            values.append(None)
            times.append(torch.zeros(t))
        else:
            with torch.inference_mode():
                values.append(transform(torch.from_numpy(decoded[0])))
            times.append(torch.as_tensor(decoded[1], dtype=torch.float32))
        ok.append(values[-1] is not None)
        if (i + 1) % 500 == 0:
            log({f"{kind}_clips": i + 1, "of": len(clips), "seconds": round(time.monotonic() - started, 1)})
    like = next((v for v in values if v is not None), None)
    if like is None:
        raise TrainError("no clip of the manifest could be decoded")
    stacked = torch.stack([v if v is not None else torch.zeros_like(like) for v in values])
    return {kind: stacked.contiguous(), "times": torch.stack(times), "ok": torch.tensor(ok, dtype=torch.uint8)}


def _ahead(fn: Callable, items: list, workers: int) -> Iterator:
    """``fn`` of each item in order, computed by ``workers`` threads at most ``2 * workers`` items ahead of the
    caller (``pool.map`` would hold every result that the caller has not taken yet: decoded frames by the GB)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _per_clip(spec: PipelineSpec, clips: list[LabelledClip], kind: str, short_side: int,
              transform: Callable[[torch.Tensor], torch.Tensor], *, detail: str = "",
              log: Log) -> Cached:
    """:func:`_decode_clips` cached on disk under ``output.dir/cache``: values, times, which clips decoded."""
    path = Path(spec.output.dir) / "cache" / f"{kind}-{_cache_key(spec, clips, kind, short_side, detail)}.safetensors"
    if path.exists():
        cached = load_file(path)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        cached = _decode_clips(spec, clips, kind, short_side, transform, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(cached, tmp)
    return cached[kind], cached["times"], cached["ok"].bool()


def frame_embeddings(spec: PipelineSpec, model: VideoTextModel, clips: list[LabelledClip], *,
                     log: Log) -> Cached:
    """``[N,T,D]`` fused frame embeddings (float32), times ``[N,T]``, and which clips decoded; cached. With
    ``tower.fusion: attention`` (trained with the head) every view instead: ``[N,T,V,D]``, the whole frame first,
    for all frames whatever ``tower.fine_frames`` says (the fusion treats each frame on its own)."""
    side, dtype = decode_short_side(spec), str(model.encoder.dtype)  # the dtype auto resolved to, here
    if spec.tower.fusion == "attention":
        def views(x: torch.Tensor) -> torch.Tensor:
            return model.tower.forward_batch([x], fine_frames="all")[0].regions.float()

        return _per_clip(spec, clips, "views", side, views, detail=dtype, log=log)
    return _per_clip(spec, clips, "frames", side, lambda x: model.tower(x).fused.float(), detail=dtype, log=log)


def frame_pixels(spec: PipelineSpec, clips: list[LabelledClip], cfg: PreprocessCfg, *, log: Log) -> Cached:
    """``[N,T,3,R,R]`` uint8: each sampled frame as the backbone sees it (the checkpoint's resize and crop, before
    normalisation), times ``[N,T]``, and which clips decoded; cached. What end-to-end training reads."""
    return _per_clip(spec, clips, "pixels", cfg.level1_side, lambda x: resize_crop(x, cfg).to(torch.uint8),
                     detail=f"{cfg.size} {cfg.crop}", log=log)


def _texts(spec: PipelineSpec, clips: list[LabelledClip]) -> tuple[list[str], torch.Tensor, dict[str, bool]]:
    """Distinct texts in first-seen order, each clip's index into them, and which texts are labels."""
    texts = list(dict.fromkeys(c.text for c in clips))
    index = {text: i for i, text in enumerate(texts)}
    return texts, torch.tensor([index[c.text] for c in clips]), {c.text: c.is_label for c in clips}


def text_embeddings(spec: PipelineSpec, model: VideoTextModel, texts: list[str],
                    is_label: dict[str, bool]) -> torch.Tensor:
    """``[Q,D]``: labels prompt-ensembled with ``tags.prompts``, captions as written."""
    return torch.stack([model.embed_labels(Vocabulary((t,)), spec.tags.prompts)[0] if is_label[t]
                        else model.embed_texts([t])[0] for t in texts]).float()


def load_clips(spec: PipelineSpec, model: VideoTextModel, manifest: str, *, log: Log) -> ClipEmbeddings:
    """A manifest's clips that decode, as frame (or view) embeddings with their texts' embeddings."""
    clips = read_manifest(manifest)
    frames, times, ok = frame_embeddings(spec, model, clips, log=log)
    texts, groups, is_label = _texts(spec, clips)
    keep = ok.nonzero().flatten()
    views = frames[keep] if frames.ndim == 4 else None
    return ClipEmbeddings(frames[keep] if views is None else views[:, :, 0], times[keep],
                          torch.ones(len(keep), frames.shape[1], dtype=torch.bool),
                          text_embeddings(spec, model, texts, is_label), groups[keep], views,
                          None if views is None else torch.tensor(spec.tower.view_levels))


def evaluate(head: AttentionPooling | None, data: ClipEmbeddings) -> dict:
    """Text->video R@1/5/10 and median rank (one query per distinct text present), zero-shot top-1, tag mAP."""
    video, text, groups = embed_clips(head, data).numpy(), data.text.numpy(), data.groups.numpy()
    present = np.unique(groups)
    scores = video @ text.T
    out = retrieval(video, text[present], groups[None, :] == present[:, None])
    out["top1"] = top1(scores, groups)
    out["mAP"] = mean_average_precision(scores, groups[:, None] == np.arange(len(text))[None, :])
    out["clips"], out["queries"] = int(len(groups)), int(len(present))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _val(metrics: dict) -> dict:
    return {"val_" + k: v for k, v in metrics.items() if k in ("R@1", "top1")}


def _log_to(path: Path) -> Log:
    def log(record: dict) -> None:
        line = json.dumps(record)
        print(line, file=sys.stderr, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def job_identity(spec: PipelineSpec) -> dict:
    """What, besides the hyperparameters, makes a training run the same job: the clips (the manifests' content),
    the model it starts from, the views and frames it sees, the prompts labels are embedded with."""
    def digest(path: str | None) -> str | None:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None

    return {"manifest": digest(spec.train.manifest), "eval_manifest": digest(spec.train.eval_manifest),
            "model": spec.model_id(), "views": spec.tower.view_levels, "fusion": spec.tower.fusion,
            "frames": spec.sampling.frames, "prompts": list(spec.tags.prompts),
            "short_side_px": spec.decode.short_side_px, "fine_frames": spec.tower.fine_frames,
            "tile_overlap": spec.tower.tile_overlap}


def run_train(spec: PipelineSpec, *, restart: bool = False) -> dict:
    """Train what ``train.backbone`` says on ``train.manifest``; write ``train.json`` and return it. An interrupted
    run of the same job resumes; a checkpoint of another job is refused unless ``restart`` (then it is replaced)."""
    if not spec.train.manifest:
        raise TrainError("train.manifest is not set: point it at a .jsonl/.csv of labelled clips")
    out = Path(spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / ("head" if spec.train.backbone == "frozen" else "model")
    if restart:  # reeltag's own checkpoint directories; the decoded-clip cache stays
        for name in ("head", "head.old", "head.tmp", "model", "model.old", "model.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif (recover_checkpoint(checkpoint) / META_FILE).exists():  # before any decoding: refuse another job's
        check_same_job(checkpoint, job_of(spec.train, job_identity(spec)), spec.train.epochs)
    log = _log_to(out / "train_log.jsonl")
    torch.manual_seed(spec.train.seed)
    started = time.monotonic()
    summary = (_train_head if spec.train.backbone == "frozen" else _train_model)(spec, out, log)
    summary = {"clips": summary.pop("clips"), "texts": summary.pop("texts"), "epochs": spec.train.epochs,
               "backbone": spec.train.backbone, "seconds": round(time.monotonic() - started, 1), **summary}
    write_text_atomic(out / "train.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train_head(spec: PipelineSpec, out: Path, log: Log) -> dict:
    """``train.backbone: frozen``: the head (and ``tower.fusion: attention``) into ``output.dir/head``."""
    model = create_model(spec, tagging=False, training=True)
    tr, fuse = spec.train, model.tower.fuse  # the fusion trains with the head and is saved in its checkpoint
    data = load_clips(spec, model, tr.manifest, log=log)
    held_out = load_clips(spec, model, tr.eval_manifest, log=log) if tr.eval_manifest else None
    task = HeadTask(data, HeadShape(dim=data.frames.shape[-1], heads=tr.heads, layers=tr.layers), tr, fuse=fuse,
                    job=job_identity(spec))
    fit(task, tr, checkpoint_dir=out / "head", log=log,
        evaluate=(lambda: _val(evaluate(task.head, held_out.fused(fuse)))) if held_out else None)
    summary = {"clips": len(data.frames), "texts": len(data.text), "checkpoint": str(out / "head"),
               "train": evaluate(task.head, data.fused(fuse))}
    if held_out:
        summary["eval"] = evaluate(task.head, held_out.fused(fuse))
    return summary


def _pixel_clips(spec: PipelineSpec, manifest: str, cfg: PreprocessCfg, *, log: Log) -> tuple[ClipPixels, list]:
    """Decoded clips of a manifest for end-to-end training, and their distinct texts (captions as written; labels
    in the first prompt template)."""
    clips = read_manifest(manifest)
    pixels, times, ok = frame_pixels(spec, clips, cfg, log=log)
    text_of = [c.text if not c.is_label else spec.tags.prompts[0].format(c.text) for c in clips]
    index = {t: i for i, t in enumerate(dict.fromkeys(text_of))}
    keep = ok.nonzero().flatten()
    groups = torch.tensor([index[t] for t in text_of])
    return ClipPixels(pixels[keep], times[keep], torch.ones(len(keep), pixels.shape[1], dtype=torch.bool),
                      groups[keep]), list(index)


def _pixel_metrics(encoder: ImageTextEncoder, head: AttentionPooling, data: ClipPixels, texts: list[str]) -> dict:
    text = F.normalize(encoder.encode_text(texts), dim=-1)
    return evaluate(head, ClipEmbeddings(data.frame_embeddings(encoder), data.times_s, data.mask, text, data.groups))


def _train_model(spec: PipelineSpec, out: Path, log: Log) -> dict:
    """``train.backbone: finetune|scratch``: the whole model and the head, end to end, into ``output.dir/model``
    (a ``save_pretrained`` directory plus the head: both ``model.pretrained`` and ``temporal.checkpoint``)."""
    tr = spec.train
    checkpoint = recover_checkpoint(out / "model")
    resume = (checkpoint / META_FILE).exists()
    # fp32 weights on the CPU whatever model.dtype says (bf16 weights do not train well); train.precision: bf16 autocast
    source = replace(spec, model=replace(spec.model, pretrained=str(checkpoint), local_files_only=True)) if resume \
        else spec
    encoder = create_model(source, tagging=False, training=True, dtype="float32", device="cpu",
                           scratch=tr.backbone == "scratch" and not resume).encoder
    torch.set_num_threads(os.cpu_count() or 1)
    data, texts = _pixel_clips(spec, tr.manifest, encoder.preprocess_cfg, log=log)
    held_out = _pixel_clips(spec, tr.eval_manifest, encoder.preprocess_cfg, log=log) if tr.eval_manifest else None
    shape = HeadShape(dim=encoder.embed_dim, heads=tr.heads, layers=tr.layers)
    precision = training_precision(tr.precision)
    log({"precision": precision})
    task = ModelTask(encoder, data, texts, shape, tr, job=job_identity(spec), bf16=precision == "bfloat16",
                     head=_start_head(spec, shape) if tr.backbone == "finetune" and not resume else None)
    fit(task, tr, checkpoint_dir=checkpoint, log=log,
        evaluate=(lambda: _val(_pixel_metrics(encoder, task.head, *held_out))) if held_out else None)
    sample = torch.randperm(len(data.pixels), generator=torch.Generator().manual_seed(0))[:1000]
    summary = {"clips": len(data.pixels), "texts": len(texts), "precision": precision, "checkpoint": str(checkpoint),
               "train": _pixel_metrics(encoder, task.head, data.subset(sample), texts)}  # 1,000 clips: a check
    if held_out:
        summary["eval"] = _pixel_metrics(encoder, task.head, *held_out)
    return summary


def training_precision(precision: str) -> str:
    """``train.precision`` as whole-model training runs it: ``auto`` is bfloat16 where the CPU has native bf16
    matmuls (AVX512_BF16, AMX), else float32."""
    if precision != "auto":
        return precision
    return "bfloat16" if cpu_has_bf16() else "float32"


def _start_head(spec: PipelineSpec, shape: HeadShape) -> AttentionPooling | None:
    """``finetune`` with ``temporal.checkpoint`` set: the head goes on from that trained one (a fresh head's first
    steps would pull the trained backbone about); its shape must be the one ``train`` asks for."""
    if not spec.temporal.checkpoint:
        return None
    head, _, meta, _ = load_checkpoint(spec.temporal.checkpoint)
    if HeadShape(**meta["shape"]) != shape:
        raise TrainError(f"temporal.checkpoint {spec.temporal.checkpoint} holds a head of shape {meta['shape']}, "
                         f"train asks for {asdict(shape)} (train.heads, train.layers, the model's "
                         "embedding size): set them to match, or temporal.checkpoint: null for a fresh head")
    return head


def run_eval(spec: PipelineSpec) -> dict:
    """Metrics of the model ``spec`` describes on ``train.eval_manifest``; write ``eval.json`` and return them."""
    if not spec.train.eval_manifest:
        raise TrainError("train.eval_manifest is not set: point it at a .jsonl/.csv of held-out labelled clips")
    model = create_model(spec, tagging=False)
    data = load_clips(spec, model, spec.train.eval_manifest, log=lambda r: None)
    head = model.pooler if spec.temporal.checkpoint else None
    result = {"pooling": spec.temporal.pooling if head is not None else "mean",
              **evaluate(head, data.fused(model.tower.fuse))}
    out = Path(spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def format_metrics(result: dict) -> str:
    keys = ["clips", "queries", "R@1", "R@5", "R@10", "median_rank", "top1", "mAP"]
    return "\n".join(f"  {k:<12} {result[k]}" for k in keys if k in result)
