"""``reeltag report``: one self-contained HTML file that summarises an output directory, for a person to look at.

It reads the committed tables of the latest config (as ``reeltag search`` does) and, per video, decodes one
frame per segment (its middle sampled frame) at a small size, embedded as a JPEG ``data:`` URI, with the region
tags drawn over it as boxes; a timeline of the video's top labels per segment, shaded by score; the actions
(with ``segments.localize``) and the errors table. Inline CSS only: no script, no external resource, so the
file can be mailed or archived alone. A video that can no longer be decoded gets placeholders, not a failure;
decoding runs in a child process (as in ``reeltag run``), so a file that hangs or crashes the decoder costs only
its own pictures.
"""

from __future__ import annotations

import base64
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from html import escape
from pathlib import Path

import numpy as np

from pipeline._isolate import IsolatedDecoder
from pipeline.decode import decode_size, open_video, probe
from pipeline.sources import local_path
from pipeline.writer import latest_config, read_table
from temporal.files import write_text_atomic

TIMELINE_LABELS = 8  # labels (rows) of a video's timeline: those with the highest summed score
ACTION_ROWS = 200  # actions listed in the report; the rest are counted
DECODE_TIMEOUT_S = 60.0  # a video's thumbnails making no progress this long are given up
_COLUMNS = ["video_id", "uri", "segment_id", "start_s", "end_s", "frame_times_s", "tags", "region_tags", "backend",
            "model", "config_hash"]  # everything but the embeddings


class ReportError(RuntimeError):
    """Nothing to report: not an output directory, or no committed videos."""


@dataclass
class _Run:
    out_dir: Path
    config_hash: str
    model: str
    segments: dict[str, list[dict]]  # video_id -> its segment rows, in time order
    errors: list[dict]
    actions: list[dict]


def write_report(output_dir: str | Path, out: str | Path | None = None, *, thumb_px: int = 96) -> Path:
    """Write the HTML report of ``output_dir`` to ``out`` (default ``output_dir/report.html``) atomically."""
    run = _load(Path(output_dir))
    out = Path(out) if out is not None else run.out_dir / "report.html"
    text = _page(run, thumb_px)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out, text)  # a failed write leaves no litter


# --- data -------------------------------------------------------------------------------------------------------

def _load(out_dir: Path) -> _Run:
    if not (out_dir / "manifest").is_dir():
        raise ReportError(f"{out_dir}: not a reeltag output directory (no manifest/; run `reeltag run` first)")
    latest = latest_config(out_dir)
    if latest is None:
        raise ReportError(f"{out_dir}: no committed videos (run `reeltag run` first)")
    config_hash, model = latest
    by_video: dict[str, list[dict]] = defaultdict(list)
    for row in _rows(out_dir, "segments", config_hash, _COLUMNS):
        by_video[row["video_id"]].append(row)
    for rows in by_video.values():
        rows.sort(key=lambda r: (r["start_s"], r["end_s"]))
    segments = dict(sorted(by_video.items(), key=lambda item: (item[1][0]["uri"], item[0])))
    errors = sorted(_rows(out_dir, "errors", config_hash), key=lambda r: (r["uri"], r["stage"]))
    actions = sorted(_rows(out_dir, "actions", config_hash), key=lambda r: (r["uri"], r["start_s"], r["label"]))
    return _Run(out_dir.resolve(), config_hash, model, segments, errors, actions)


def _rows(out_dir: Path, name: str, config_hash: str, columns: list[str] | None = None) -> list[dict]:
    table = read_table(out_dir, name, config_hash)
    return (table.select(columns) if columns else table).to_pylist()


def _middle_time(row: dict) -> float:
    times = row["frame_times_s"]
    return float(times[len(times) // 2]) if times else (row["start_s"] + row["end_s"]) / 2


def _thumbnail_rows(uri: str, times_s: list[float], short_side: int):
    """Decoder child: one row with the thumbnails, or with why there are none."""
    try:
        yield {"images": _thumbnails(uri, times_s, short_side)}
    except Exception as e:  # noqa: BLE001 - a moved, deleted or unreadable video only loses its pictures
        yield {"failure": f"{type(e).__name__}: {e}"}


def _thumbnails(uri: str, times_s: list[float], short_side: int) -> list[tuple[bytes, int, int]]:
    """(JPEG bytes, width, height) of the frame nearest each time (seconds from the first frame), decoded exactly
    with PyAV at ``short_side`` pixels."""
    with local_path(uri) as path:
        info, index = probe(path)
        nearest = _nearest(index.times_s, np.asarray(times_s))  # [S] frame indices
        needed = np.unique(nearest)
        reader = open_video(path, info, index, decode_size(info, short_side), backend="pyav", requested="pyav")
        try:
            frames = reader.read(needed)  # [F, H, W, 3]
        finally:
            reader.close()
    height, width = frames.shape[1:3]
    return [(_jpeg(frames[i]), width, height) for i in np.searchsorted(needed, nearest)]


def _nearest(sorted_times: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the entry of ``sorted_times`` nearest each of ``times``."""
    if len(sorted_times) == 1:
        return np.zeros(len(times), np.int64)
    right = np.clip(np.searchsorted(sorted_times, times), 1, len(sorted_times) - 1)
    left = right - 1
    return np.where(times - sorted_times[left] <= sorted_times[right] - times, left, right)


def _jpeg(rgb: np.ndarray) -> bytes:
    """One RGB frame ``[H, W, 3]`` as a baseline JPEG, with FFmpeg's MJPEG encoder (no image library needed)."""
    import av

    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    codec.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


# --- HTML -------------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 2px; } h3 { font-size: 14px; }
.muted { color: #656d76; } .mono { font-family: ui-monospace, monospace; word-break: break-all; }
.counts span { display: inline-block; margin-right: 18px; } .counts b { font-size: 18px; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 4px 8px; margin: 6px 0; }
.scroll { overflow-x: auto; padding-bottom: 4px; }
.strip { display: flex; gap: 8px; align-items: flex-start; }
figure { margin: 0; flex: none; }
figcaption { font-size: 11px; color: #656d76; max-width: 160px; }
.thumb { position: relative; display: inline-block; vertical-align: top; overflow: hidden; background: #d0d7de; }
.thumb img { display: block; }
.missing { display: flex; align-items: center; justify-content: center; font-size: 11px; color: #57606a;
           border: 1px dashed #8c959f; box-sizing: border-box; text-align: center; }
.box { position: absolute; box-sizing: border-box; border: 1px solid rgba(255, 214, 0, 0.9); }
.box span { position: absolute; left: 0; top: 0; max-width: 100%; overflow: hidden; text-overflow: ellipsis;
            font-size: 9px; line-height: 1.1; color: #000; background: rgba(255, 214, 0, 0.85); padding: 0 2px;
            white-space: nowrap; box-sizing: border-box; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 2px 6px; text-align: left; vertical-align: top; }
.timeline td { min-width: 22px; height: 18px; padding: 0; }
.timeline th { font-weight: normal; font-size: 12px; white-space: nowrap; }
.timeline thead th { font-size: 11px; color: #656d76; }
"""


def _page(run: _Run, thumb_px: int) -> str:

    body = [_header(run)]
    decoder = IsolatedDecoder(_thumbnail_rows, timeout_s=DECODE_TIMEOUT_S, recycle_after=100)
    try:
        for rows in run.segments.values():
            errors = [e for e in run.errors if e["video_id"] == rows[0]["video_id"]]
            body.append(_video(rows, errors, thumb_px, decoder))
    finally:
        decoder.close()
    if run.actions:
        body.append(_actions(run.actions))
    body.append(_errors(run.errors))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>reeltag report: {escape(str(run.out_dir))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _header(run: _Run) -> str:
    videos = set(run.segments) | {e["video_id"] for e in run.errors}
    n_segments = sum(len(rows) for rows in run.segments.values())
    counts = [("videos", len(videos)), ("segments", n_segments), ("errors", len(run.errors))]
    if run.actions:
        counts.append(("actions", len(run.actions)))
    return (f'<header>\n<h1>reeltag report</h1>\n<p class="mono">{escape(str(run.out_dir))}</p>\n'
            f'<p class="counts">' + "".join(f"<span><b>{n}</b> {name}</span>" for name, n in counts) + "</p>\n"
            f'<p class="muted">model <span class="mono">{escape(run.model)}</span> · config '
            f'<span class="mono">{escape(run.config_hash)}</span> (the latest committed) · written '
            f"{escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>\n"
            '<p class="muted">Per video: one frame per segment (its middle sampled frame) with the region tags as '
            "boxes, then a timeline of its top labels: a cell's shade is the tag's score (softmax over the "
            "vocabulary), blank when the label is not among the segment's top tags; hover for score and "
            "confidence.</p>\n</header>")


def _video(rows: list[dict], errors: list[dict], thumb_px: int, decoder) -> str:
    uri = rows[0]["uri"]
    (result,) = decoder.run(uri, [_middle_time(r) for r in rows], thumb_px,
                            on_fail=lambda kind, message, _: {"failure": f"{kind}: {message}"})
    images, failure = result.get("images", [None] * len(rows)), result.get("failure", "")
    notes = [f"frames unavailable, placeholders shown ({failure})"] if failure else []
    notes += [f"{e['stage']} error ({e['error_type']}): {e['message']}" for e in errors]
    end = max(r["end_s"] for r in rows)
    return (f'<section class="video">\n<h2>{escape(os.path.basename(uri) or uri)}</h2>\n'
            f'<p class="muted"><span class="mono">{escape(uri)}</span> · {len(rows)} segments · '
            f"up to {_fmt_s(end)} · decoder in the run: {escape(rows[0]['backend'])}</p>\n"
            + "".join(f'<p class="note">{escape(n)}</p>\n' for n in notes)
            + '<div class="scroll"><div class="strip">\n'
            + "\n".join(_figure(r, img, uri, thumb_px, failure) for r, img in zip(rows, images))
            + "\n</div></div>\n" + _timeline(rows) + "\n</section>")


def _figure(row: dict, image: tuple[bytes, int, int] | None, uri: str, thumb_px: int, failure: str) -> str:
    if image is None:
        thumb = (f'<div class="thumb missing" style="width:{thumb_px}px;height:{thumb_px}px" '
                 f'title="{escape(failure)}">no frame')
    else:
        jpeg, width, height = image
        alt = f"{os.path.basename(uri)} at {_middle_time(row):.2f} s"
        thumb = (f'<div class="thumb"><img src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}" '
                 f'alt="{escape(alt)}" width="{width}" height="{height}">')
    boxes = "".join(_box(t) for t in row["region_tags"]) if image else ""  # a placeholder has no aspect to match
    best = row["tags"][0] if row["tags"] else None
    caption = escape(_span(row)) + (f"<br><b>{escape(best['label'])}</b> {best['score']:.2f}" if best else "")
    return f"<figure>{thumb}{boxes}</div><figcaption>{caption}</figcaption></figure>"


def _box(tag: dict) -> str:
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) * 100 for v in tag["box"])
    title = f"{tag['label']}: score {tag['score']:.3f}, confidence {tag['confidence']:.3f}"
    return (f'<div class="box" style="left:{x0:.2f}%;top:{y0:.2f}%;width:{x1 - x0:.2f}%;height:{y1 - y0:.2f}%" '
            f'title="{escape(title)}"><span>{escape(tag["label"])}</span></div>')


def _timeline(rows: list[dict]) -> str:
    """Rows: the video's top labels; columns: its segments in time order; shade: the label's score there."""
    scores: list[dict[str, dict]] = [{t["label"]: t for t in r["tags"]} for r in rows]
    total: dict[str, float] = defaultdict(float)
    for tags in scores:
        for label, t in tags.items():
            total[label] += t["score"]
    labels = sorted(total, key=lambda label: (-total[label], label))[:TIMELINE_LABELS]
    if not labels:
        return '<p class="muted">no tags (the run had no vocabulary)</p>'
    head = "".join(f'<th title="{escape(_span(r))}">{escape(_fmt_s(r["start_s"]))}</th>' for r in rows)
    body = []
    for label in labels:
        cells = "".join(_cell(label, r, tags.get(label)) for r, tags in zip(rows, scores))
        body.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    return ('<div class="scroll"><table class="timeline">\n<thead><tr><th>label \\ segment start</th>'
            f"{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>")


def _cell(label: str, row: dict, tag: dict | None) -> str:
    if tag is None:
        return f'<td title="{escape(f"{label} · {_span(row)} · not in the top tags")}"></td>'
    title = f"{label} · {_span(row)} · score {tag['score']:.3f} · confidence {tag['confidence']:.3f}"
    alpha = min(max(float(tag["score"]), 0.0), 1.0)
    return f'<td style="background:rgba(9,105,218,{alpha:.3f})" title="{escape(title)}"></td>'


def _actions(actions: list[dict]) -> str:
    rows = [f"<tr><td>{escape(os.path.basename(a['uri']))}</td><td>{escape(a['label'])}</td>"
            f"<td>{escape(_fmt_s(a['start_s']))}–{escape(_fmt_s(a['end_s']))}</td><td>{a['score']:.3f}</td></tr>"
            for a in actions[:ACTION_ROWS]]
    more = len(actions) - ACTION_ROWS
    return ('<section class="actions">\n<h2>Actions</h2>\n<table>\n<thead><tr><th>video</th><th>label</th>'
            "<th>time</th><th>confidence</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
            + (f'<p class="muted">and {more} more in actions/actions.parquet</p>\n' if more > 0 else "")
            + "</section>")


def _errors(errors: list[dict]) -> str:
    if not errors:
        return '<section class="errors">\n<h2>Errors</h2>\n<p class="muted">none</p>\n</section>'
    rows = [f"<tr><td class=\"mono\">{escape(e['uri'])}</td><td>{escape(e['stage'])}</td>"
            f"<td>{escape(e['error_type'])}</td><td>{escape(e['message'])}</td></tr>" for e in errors]
    return ('<section class="errors">\n<h2>Errors</h2>\n<table>\n<thead><tr><th>uri</th><th>stage</th>'
            "<th>error_type</th><th>message</th></tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>\n</section>")


def _span(row: dict) -> str:
    return f"{_fmt_s(row['start_s'])}–{_fmt_s(row['end_s'])}"


def _fmt_s(s: float) -> str:
    """Seconds for people: ``2.5 s``, ``1:02.5``, ``1:02:03``."""
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(s, 60)
    if minutes < 60:
        return f"{int(minutes)}:{seconds:04.1f}"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{int(seconds):02d}"
