"""An evaluation-only renderer of the SynthActions vocabulary, written apart from ``pipeline/synth.py``.

Nothing here is shared with the training renderer: shapes are drawn with PIL's ``ImageDraw`` (supersampled for
soft edges or not), colours are other shades of the four names, backgrounds are other images (PIL gradients,
blurred noise, grids, two-tone splits, photographs-like bands), frames are 256-640 px at many aspect ratios, and
the files are written by the ``ffmpeg`` CLI (libx264, crf 18-30) from raw frames on its stdin. It is never used for
training: ``benchmarks/demo_model.py`` and ``tests/jobs/test_demo.py`` measure the demo model on it.

Also long videos (:func:`write_long`): 45-90 s of background holding several 4 s actions, some among a
distractor (a grey blob drifting, the background panning), with their true spans, for localisation.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHADES = {  # none of them is pipeline.synth's colour
    "red": [(196, 38, 52), (236, 74, 58), (164, 22, 36), (214, 50, 90)],
    "green": [(44, 156, 66), (96, 196, 84), (24, 118, 44), (60, 176, 120)],
    "blue": [(34, 74, 196), (74, 112, 236), (22, 44, 158), (40, 120, 210)],
    "yellow": [(244, 206, 44), (218, 188, 24), (252, 228, 96), (236, 180, 30)],
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
SIZES = ((256, 256), (320, 240), (480, 270), (640, 360), (360, 640), (640, 274), (400, 300), (288, 512))
BACKGROUNDS = ("solid", "gradient", "noise", "grid", "split", "bands")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    width: int
    height: int
    fps: float
    seconds: float
    size: float  # shape diameter, fraction of the short side
    shade: int  # index into SHADES[colour]
    background: str
    level: int  # background brightness 20..230
    soft: bool  # supersampled edges
    crf: int
    seed: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


def scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes, motions cycling, everything else drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        width, height = SIZES[rng.integers(len(SIZES))]
        colour = str(rng.choice(list(SHADES)))
        out.append(Scene(colour, str(rng.choice(SHAPES)), MOTIONS[i % len(MOTIONS)], int(width), int(height),
                         float(rng.choice([24.0, 25.0, 30.0])), float(rng.uniform(2.0, 3.5)),
                         float(rng.uniform(0.12, 0.4)), int(rng.integers(len(SHADES[colour]))),
                         str(rng.choice(BACKGROUNDS)), int(rng.integers(20, 231)), bool(rng.integers(2)),
                         int(rng.integers(18, 31)), int(rng.integers(2**31))))
    return out


def backdrop(kind: str, width: int, height: int, level: int, rng: np.random.Generator) -> Image.Image:
    """An RGB background image of the given kind around brightness ``level``."""
    tint = tuple(int(np.clip(level + d, 0, 255)) for d in rng.integers(-30, 31, 3))
    if kind == "solid":
        return Image.new("RGB", (width, height), tint)
    if kind == "gradient":
        ramp = Image.linear_gradient("L").rotate(float(rng.uniform(0, 360)))  # 256 px, corners filled black:
        ramp = ramp.crop((38, 38, 218, 218)).resize((width, height))  # the square inside the rotated one
        low = Image.new("RGB", (width, height), tuple(max(0, c - 60) for c in tint))
        high = Image.new("RGB", (width, height), tuple(min(255, c + 60) for c in tint))
        return Image.composite(high, low, ramp)
    if kind == "noise":
        grain = Image.effect_noise((width, height), float(rng.uniform(20, 60))).filter(
            ImageFilter.GaussianBlur(float(rng.uniform(0.5, 6))))
        noise = np.asarray(grain, np.float32) - 128.0
        base = np.asarray(Image.new("RGB", (width, height), tint), np.float32)
        return Image.fromarray(np.clip(base + noise[..., None], 0, 255).astype(np.uint8))
    image = Image.new("RGB", (width, height), tint)
    draw = ImageDraw.Draw(image)
    other = tuple(int(np.clip(c + rng.integers(-50, 51), 0, 255)) for c in tint)
    if kind == "grid":
        step = int(rng.integers(12, 48))
        for x in range(0, width, step):
            draw.line([(x, 0), (x, height)], fill=other, width=1)
        for y in range(0, height, step):
            draw.line([(0, y), (width, y)], fill=other, width=1)
    elif kind == "split":
        draw.rectangle([0, int(height * rng.uniform(0.3, 0.7)), width, height], fill=other)
    else:  # bands: a few wide soft stripes
        for k in range(int(rng.integers(3, 7))):
            y = int(rng.uniform(0, height))
            draw.rectangle([0, y, width, y + int(rng.uniform(8, 40))], fill=other if k % 2 else tint)
        image = image.filter(ImageFilter.GaussianBlur(3))
    return image


def _centre_radius(scene: Scene, progress: float) -> tuple[float, float, float]:
    w, h = scene.width, scene.height
    r = scene.size * min(w, h) / 2
    span_x, span_y = (w - 2 * r) * 0.7, (h - 2 * r) * 0.7
    cx, cy = w / 2, h / 2
    match scene.motion:
        case "moving left":
            cx = w / 2 + span_x * (0.5 - progress)
        case "moving right":
            cx = w / 2 + span_x * (progress - 0.5)
        case "moving up":
            cy = h / 2 + span_y * (0.5 - progress)
        case "moving down":
            cy = h / 2 + span_y * (progress - 0.5)
        case "growing":
            r *= 0.55 + 0.75 * progress
        case "shrinking":
            r *= 1.3 - 0.75 * progress
    return cx, cy, r


def draw_shape(image: Image.Image, shape: str, cx: float, cy: float, r: float, colour: tuple, soft: bool) -> None:
    """Draw in place with ImageDraw; ``soft``: at 4x on a mask, scaled down (anti-aliased edges)."""
    k = 4 if soft else 1
    mask = Image.new("L", (image.width * k, image.height * k), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:
        draw.polygon([(cx * k, y0), (x1, y1), (x0, y1)], fill=255)
    if soft:
        mask = mask.resize(image.size, Image.LANCZOS)
    image.paste(Image.new("RGB", image.size, colour), (0, 0), mask)


def frames_of(scene: Scene) -> list[np.ndarray]:
    rng = np.random.default_rng(scene.seed)
    back = backdrop(scene.background, scene.width, scene.height, scene.level, rng)
    n = max(2, round(scene.seconds * scene.fps))
    out = []
    for i in range(n):
        frame = back.copy()
        draw_shape(frame, scene.shape, *_centre_radius(scene, i / (n - 1)), SHADES[scene.colour][scene.shade],
                   scene.soft)
        out.append(np.asarray(frame))
    return out


def encode(path: Path, frames, width: int, height: int, fps: float, crf: int) -> Path:
    """Raw RGB frames through the ffmpeg CLI to H.264 (yuv420p), as a camera or an editor would write them."""
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
           "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
           "-pix_fmt", "yuv420p", str(path)]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE) as proc:
        for frame in frames:
            proc.stdin.write(np.ascontiguousarray(frame, np.uint8).tobytes())
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg could not write {path}")
    return path


def write_scenes(directory: str | Path, items: list[Scene]) -> Path:
    """``NNNN.mp4`` per scene and ``labels.jsonl`` (uri, start_s, end_s, caption, the scene's factors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "labels.jsonl", "w") as f:
        for i, scene in enumerate(items):
            path = encode(directory / f"{i:04d}.mp4", frames_of(scene), scene.width, scene.height, scene.fps,
                          scene.crf)
            f.write(json.dumps({**asdict(scene), "uri": str(path.resolve()), "start_s": 0.0,
                                "end_s": scene.seconds, "caption": scene.caption}) + "\n")
    return directory / "labels.jsonl"


@dataclass
class LongVideo:
    seconds: float
    actions: list[tuple[float, Scene]] = field(default_factory=list)  # (start_s, scene), each scene 4 s
    distractor: str = "none"  # none, blob (a grey shape drifting all along), pan (the background moves)


def long_videos(n: int, seed: int) -> list[LongVideo]:
    """``n`` videos of 45-90 s at 480x270 (or 360x640), each with 3-5 non-overlapping 4 s actions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seconds = float(rng.uniform(45, 90))
        free = np.arange(1, int(seconds // 8))  # 8 s slots after the first: an action and background around it
        count = min(int(rng.integers(3, 6)), len(free))
        slots = np.sort(rng.choice(free, size=count, replace=False)) * 8.0
        width, height = (480, 270) if i % 3 else (360, 640)
        base = scenes(count, int(rng.integers(2**31)))
        video = LongVideo(seconds, distractor=("none", "blob", "pan")[i % 3])
        for start, scene in zip(slots, base):
            video.actions.append((float(start + rng.uniform(0, 3)), Scene(
                scene.colour, scene.shape, scene.motion, width, height, 25.0, 4.0, scene.size, scene.shade,
                "noise", 0, scene.soft, 23, scene.seed)))
        out.append(video)
    return out


def long_frames(video: LongVideo, seed: int):
    """Frames of a long video at 25 fps: its background (panning if ``pan``), a grey blob drifting if ``blob``,
    and each action drawn during its 4 s."""
    rng = np.random.default_rng(seed)
    width, height = video.actions[0][1].width, video.actions[0][1].height
    back = backdrop("noise", width + 200, height, int(rng.integers(60, 190)), rng)
    n = round(video.seconds * 25)
    for i in range(n):
        t = i / 25
        shift = int(100 + 90 * np.sin(t / 6)) if video.distractor == "pan" else 100
        frame = back.crop((shift, 0, shift + width, height))
        if video.distractor == "blob":
            bx = width * (0.5 + 0.4 * np.sin(t / 5))
            by = height * (0.5 + 0.3 * np.cos(t / 7))
            draw_shape(frame, "circle", bx, by, min(width, height) * 0.12, (150, 150, 150), True)
        for start, scene in video.actions:
            if start <= t < start + scene.seconds:
                draw_shape(frame, scene.shape, *_centre_radius(scene, (t - start) / scene.seconds),
                           SHADES[scene.colour][scene.shade], scene.soft)
        yield np.asarray(frame)


def write_long(directory: str | Path, videos: list[LongVideo]) -> Path:
    """``long-NN.mp4`` per video and ``actions.jsonl``: one row per action (uri, start_s, end_s, caption)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "actions.jsonl", "w") as f:
        for i, video in enumerate(videos):
            width, height = video.actions[0][1].width, video.actions[0][1].height
            path = encode(directory / f"long-{i:02d}.mp4", long_frames(video, i), width, height, 25.0, 23)
            for start, scene in video.actions:
                f.write(json.dumps({"uri": str(path.resolve()), "start_s": start, "end_s": start + scene.seconds,
                                    "caption": scene.caption, "distractor": video.distractor}) + "\n")
    return directory / "actions.jsonl"
