"""Synthetic videos: one coloured shape moving on a plain or noisy background, written with PyAV.

Used by the tests (real encoded files, known content) and by the offline demo.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
SMALL = (0.02, 0.04)  # the `small` split: the shape is 2-4% of the short side, for the tower's tiles
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
# named data sets (`reeltag synth --split`): `actions` trains and evaluates the demo model, `small` tests the tower;
SPLITS = {
    "actions": dict(size=(0.08, 0.45), frame_sizes=((96, 64), (80, 80), (64, 96), (128, 96), (96, 128))),
    "small": dict(size=SMALL, frame_sizes=((256, 192), (192, 192), (192, 256))),
    # training only: shapes as small as the tower's level-2 tiles see the `small` split's (2-5 px in a 64 px view)
    "tiny": dict(size=(0.035, 0.08), frame_sizes=((96, 64), (80, 80), (64, 96), (128, 96), (96, 128))),
    # the `actions` clips with real variety: any background brightness and tint, textures, shades of each colour,
    # soft or hard edges, camera noise, frame sizes 64-640 px at aspect ratios 9:16 to 21:9 (what trains the demo);
    # a panning camera or a colourless moving distractor in a third of clips each (long videos have both); at 6-10
    # fps: training samples 3 frames a clip, and writing more was most of the time making them
    "varied": dict(size=(0.08, 0.45), fps=(6.0, 10.0), varied=True),
    # training only: the varied split's scenes with no shape in them (a third panning, a third with a distractor),
    # captioned EMPTY: what a long video shows between actions, which no action caption should match
    "empty": dict(size=(0.08, 0.45), fps=(6.0, 10.0), varied=True, shapes=("none",)),
}
EMPTY = "an empty background"  # the `empty` split's caption (training only; no tag vocabulary has it)
TEXTURES = ("flat", "noise", "gradient", "stripes", "blobs")
# what each colour name covers, for the varied split's shades: hue range in degrees, least saturation and value
HUES = {"red": (-20.0, 15.0, 0.6, 0.55), "green": (95.0, 155.0, 0.45, 0.45), "blue": (200.0, 245.0, 0.5, 0.5),
        "yellow": (42.0, 62.0, 0.6, 0.75)}


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    motion: str
    width: int = 96  # pixels
    height: int = 64  # pixels
    fps: float = 25.0  # frames per second
    duration_s: float = 2.0  # seconds
    noise: float = 0.0  # background noise amplitude, 0..255
    size: float = 0.3  # shape diameter as a fraction of the short side
    travel: float = 0.8  # moving: fraction of the free space crossed (the speed); growing/shrinking: size range
    offset: float = 0.0  # start position across the motion, as a fraction of the free space (-0.5..0.5)
    crf: int = 18  # H.264 quality when written (higher: more compression artefacts)
    seed: int = 0
    # variety (the `varied` split; the defaults draw the plain grey-128 clips every split had before):
    background: float = 128.0  # background brightness, 0..255
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the background per channel
    texture: str = "flat"  # flat, noise, gradient, stripes, blobs: the background's pattern (never a shape)
    texture_scale: float = 0.2  # the pattern's period or grain, as a fraction of the short side
    texture_amp: float = 0.0  # the pattern's amplitude, 0..255
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the named colour per channel (a shade of it)
    antialias: bool = False  # soft shape edges (coverage at 4x4 subpixels) instead of hard ones
    camera_noise: float = 0.0  # per-frame sensor noise, 0..255 (changes every frame, unlike `noise`)
    # camera motion: the background slides by this much over the clip (x, y), as fractions of the short side; the
    # caption is the shape's motion in the frame, whatever the camera does
    pan: tuple[float, float] = (0.0, 0.0)
    # a moving distractor behind the shape: a colourless circle, square or triangle (`none`: no distractor) of
    # brightness `distractor_level` and diameter `distractor_size` (of the short side), drifting from (x0, y0) to
    # (x1, y1) (fractions of the frame); `shape: none` draws no named shape (the `empty` split)
    distractor: str = "none"
    distractor_level: float = 128.0
    distractor_size: float = 0.2
    distractor_path: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.5)

    @property
    def caption(self) -> str:
        return EMPTY if self.shape == "none" else f"a {self.colour} {self.shape} {self.motion}"


def _inside(shape: str, y: np.ndarray, x: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """bool: which of the pixel coordinates ``y, x`` the shape covers."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (abs(x - cx) <= r) & (abs(y - cy) <= r)
    return (y <= cy + r) & (y >= cy - r) & (abs(x - cx) <= (y - (cy - r)) / 2)  # triangle, apex up


def _background(clip: Clip, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` float32: brightness + tint + a texture (noise, a gradient, stripes or smooth blobs)."""
    base = np.full((h, w, 3), clip.background, np.float32) + np.asarray(clip.tint, np.float32)
    if clip.texture == "flat" or not clip.texture_amp:
        return base
    period = max(2.0, clip.texture_scale * min(h, w))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    match clip.texture:
        case "noise":  # grain of about `period` / 4 pixels, upsampled without smoothing
            grain = max(1, round(period / 4))
            cells = rng.uniform(-1, 1, (h // grain + 1, w // grain + 1, 3)).astype(np.float32)
            pattern = cells.repeat(grain, 0).repeat(grain, 1)[:h, :w]
        case "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            ramp = (np.cos(angle) * x + np.sin(angle) * y) / max(h, w)
            pattern = (ramp - ramp.mean())[..., None] * rng.uniform(-2, 2, 3).astype(np.float32)
        case "stripes":
            angle = rng.uniform(0, np.pi)
            pattern = np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)[..., None] + np.zeros(3)
        case "blobs":  # a few broad Gaussians of random colour
            pattern = np.zeros((h, w, 3), np.float32)
            for _ in range(4):
                cy, cx, sigma = rng.uniform(0, h), rng.uniform(0, w), period * rng.uniform(0.5, 1.5)
                blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))
                pattern += blob[..., None] * rng.uniform(-1, 1, 3).astype(np.float32)
        case _:
            raise ValueError(f"unknown texture {clip.texture!r}; expected flat, noise, gradient, stripes or blobs")
    return base + clip.texture_amp * pattern.astype(np.float32)


def _paint(frame: np.ndarray, shape: str, antialias: bool, colour: np.ndarray, cx: float, cy: float, r: float) -> None:
    """Draw the shape into ``frame`` in place, computing only its bounding box (hard edges: exactly the pixels
    inside; ``antialias``: blended by coverage at 4x4 subpixels)."""
    h, w = frame.shape[:2]
    y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(h, int(np.ceil(cy + r)) + 2)
    x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(w, int(np.ceil(cx + r)) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # absolute coordinates: the same arithmetic as a whole frame
    window = frame[y0:y1, x0:x1]
    if not antialias:
        window[_inside(shape, y, x, cx, cy, r)] = colour
        return
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    cover = np.mean([_inside(shape, y, x, cx - dx, cy - dy, r) for dy in offsets for dx in offsets], axis=0,
                    dtype=np.float32)[..., None]
    window[:] = (window * (1 - cover) + colour * cover).clip(0, 255)


def render(clip: Clip) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` frames of the clip."""
    rng = np.random.default_rng(clip.seed)
    n = max(2, round(clip.duration_s * clip.fps))
    h, w = clip.height, clip.width
    # panning: a background larger by the camera's travel, of which each frame sees a window
    travel = np.asarray(clip.pan, np.float32) * min(h, w)
    bh, bw = h + int(np.ceil(abs(travel[1]))), w + int(np.ceil(abs(travel[0])))
    base = _background(clip, rng, bh, bw) if clip.texture != "flat" or clip.tint != (0.0, 0.0, 0.0) or (
        clip.background != 128.0) else np.full((bh, bw, 3), 128, np.float32)
    if clip.noise:
        base = base + rng.normal(0, clip.noise, (bh, bw, 3))
    base = base.clip(0, 255).astype(np.uint8)  # frames are painted in uint8: only the shapes' boxes are touched
    # camera noise: four frames of it, cycled (drawing a frame of normals each frame was most of the render time)
    grain = clip.camera_noise * rng.standard_normal((4, h, w, 3), dtype=np.float32) if clip.camera_noise else None
    colour = np.clip(np.asarray(COLOURS[clip.colour], np.float32) + np.asarray(clip.shade, np.float32), 0, 255)
    r0 = clip.size * min(h, w) / 2
    frames = []
    free_x, free_y = max(w - 2 * r0, 0), max(h - 2 * r0, 0)
    for i in range(n):
        p = i / (n - 1)  # progress 0..1
        cx, cy, r = w / 2 + clip.offset * free_x, h / 2 + clip.offset * free_y, r0
        travel_x, travel_y = free_x * clip.travel, free_y * clip.travel
        match clip.motion:
            case "moving left":
                cx = w / 2 + travel_x * (0.5 - p)
            case "moving right":
                cx = w / 2 + travel_x * (p - 0.5)
            case "moving up":
                cy = h / 2 + travel_y * (0.5 - p)
            case "moving down":
                cy = h / 2 + travel_y * (p - 0.5)
            case "growing":
                r = r0 * (1.2 - clip.travel + clip.travel * 1.25 * p)
            case "shrinking":
                r = r0 * (1.2 + clip.travel * 0.25 - clip.travel * 1.25 * p)
        # the camera's window at progress p (moving right/down for positive travel: the background moves left/up)
        x0 = round(p * travel[0]) if travel[0] >= 0 else round((1 - p) * -travel[0])
        y0 = round(p * travel[1]) if travel[1] >= 0 else round((1 - p) * -travel[1])
        frame = base[y0:y0 + h, x0:x0 + w].copy()
        if clip.distractor != "none":
            dx0, dy0, dx1, dy1 = clip.distractor_path
            _paint(frame, clip.distractor, clip.antialias, np.full(3, clip.distractor_level, np.float32),
                   w * (dx0 + (dx1 - dx0) * p), h * (dy0 + (dy1 - dy0) * p), clip.distractor_size * min(h, w) / 2)
        if clip.shape != "none":
            _paint(frame, clip.shape, clip.antialias, colour, cx, cy, r)
        if grain is not None:
            frame = (frame + grain[i % 4]).clip(0, 255).astype(np.uint8)
        frames.append(frame)
    return np.stack(frames)


def write_video(path: str | Path, frames: np.ndarray, *, fps: float = 25.0, codec: str = "libx264",
                options: dict | None = None, pix_fmt: str = "yuv420p", times_s: np.ndarray | None = None,
                container_options: dict | None = None) -> Path:
    """Encode uint8 ``[N,H,W,3]`` frames to ``path`` with PyAV; ``times_s`` gives each frame's own presentation
    time (a variable-frame-rate file), otherwise frames are ``1/fps`` apart."""
    from fractions import Fraction

    import av

    path = Path(path)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        x264 = codec == "libx264"
        opts = {k: str(v) for k, v in (options or ({"crf": 18, "preset": "veryfast"} if x264 else {})).items()}
        if x264:  # one thread unless asked: PyAV's default slice threads cut each frame into a slice per core,
            opts.setdefault("threads", "1")  # so the bytes would depend on the machine
        stream.options = opts
        if times_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times_s is not None:
                video_frame.pts, video_frame.time_base = round(times_s[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


Range = tuple[float, float]  # (low, high) of a drawn factor


def sample_clips(n: int, *, seed: int, motions: tuple[str, ...] = MOTIONS,
                 frame_sizes: tuple[tuple[int, int], ...] = ((96, 64), (80, 80), (64, 96)), fps: Range = (24.0, 30.0),
                 duration_s: Range = (2.0, 4.0), size: Range = (0.2, 0.4), noise: Range = (0.0, 25.0),
                 varied: bool = False, shapes: tuple[str, ...] = SHAPES) -> list[Clip]:
    """``n`` clips, deterministic by ``seed``: motions cycle (balanced classes), every other factor is drawn;
    ``varied``: backgrounds, shades, edges, camera noise and frame sizes drawn too (:func:`vary`); ``shapes``
    ``("none",)``: no shape at all (the `empty` split)."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        width, height = frame_sizes[rng.integers(len(frame_sizes))]
        clips.append(Clip(str(rng.choice(list(COLOURS))), str(rng.choice(shapes)), motions[i % len(motions)],
                          width=int(width), height=int(height), fps=float(rng.uniform(*fps)),
                          duration_s=float(rng.uniform(*duration_s)), noise=float(rng.uniform(*noise)),
                          size=float(rng.uniform(*size)), seed=int(rng.integers(2**31))))
    # speed, start position and encoding quality come from each clip's own seed, so adding them left the draws
    # above (and every data set made before) unchanged
    drawn = []
    for clip in clips:
        own = np.random.default_rng(clip.seed)
        drawn.append(replace(clip, travel=float(own.uniform(0.5, 0.9)), offset=float(own.uniform(-0.3, 0.3)),
                             crf=int(own.integers(18, 31))))
    return [vary(c) for c in drawn] if varied else drawn


def _shade(colour: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random shade of ``colour`` (hue, saturation and value within :data:`HUES`), as an offset from
    :data:`COLOURS`."""
    import colorsys

    low, high, saturation, value = HUES[colour]
    rgb = colorsys.hsv_to_rgb((rng.uniform(low, high) % 360) / 360, rng.uniform(saturation, 1), rng.uniform(value, 1))
    return tuple(float(255 * c - base) for c, base in zip(rgb, COLOURS[colour]))


def vary(clip: Clip) -> Clip:
    """``clip`` with real variety drawn from its own seed: background brightness 30-220 and a tint, a texture
    (noise, gradient, stripes, blobs; textures, never shapes) at a scale, a shade of its colour, soft or hard
    edges, camera noise, a frame of 64-640 px a side at an aspect ratio from 9:16 to 21:9, and (:func:`_scene`) a
    panning camera or a colourless distractor."""
    rng = np.random.default_rng([clip.seed, 1])  # its own stream: the factors drawn before stay as they were
    aspect = float(np.exp(rng.uniform(np.log(9 / 16), np.log(21 / 9))))
    short = float(np.exp(rng.uniform(np.log(64), np.log(360))))  # log-uniform: most frames small, some large
    long = min(640.0, short * max(aspect, 1 / aspect))
    width, height = (long, short) if aspect >= 1 else (short, long)
    return replace(clip, width=int(round(width / 2) * 2), height=int(round(height / 2) * 2),
                   background=float(rng.uniform(30, 220)), tint=tuple(float(v) for v in rng.uniform(-25, 25, 3)),
                   texture=str(rng.choice(TEXTURES)), texture_scale=float(np.exp(rng.uniform(np.log(0.03),
                                                                                           np.log(0.6)))),
                   texture_amp=float(rng.uniform(5, 35)), shade=_shade(clip.colour, rng),
                   antialias=bool(rng.integers(2)), camera_noise=float(rng.uniform(0, 6) if rng.integers(2) else 0),
                   noise=0.0, **_scene(clip))


def _scene(clip: Clip) -> dict:
    """What long videos show around an action, drawn from the clip's own seed: a size log-uniform over the same
    range (more small shapes), a panning camera in a third of clips and a colourless moving distractor in a third."""
    rng = np.random.default_rng([clip.seed, 2])
    low, high = SPLITS["varied"]["size"]
    drawn = dict(size=float(np.exp(rng.uniform(np.log(low), np.log(high)))))
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.12) * clip.duration_s  # short sides a second
    if rng.random() < 1 / 3:
        drawn["pan"] = (float(speed * np.cos(angle)), float(speed * np.sin(angle)))
    if rng.random() < 1 / 3:
        drawn.update(distractor=str(rng.choice(SHAPES)), distractor_level=float(rng.uniform(20, 235)),
                     distractor_size=float(rng.uniform(0.08, 0.3)),
                     distractor_path=tuple(float(v) for v in rng.uniform(0.15, 0.85, 4)))
    return drawn


def _write_clip(path: Path, clip: Clip) -> str:
    return str(write_video(path, render(clip), fps=clip.fps, options={"crf": clip.crf, "preset": "veryfast"}).resolve())


def write_clips(directory: str | Path, clips: list[Clip], *, caption: Callable[[Clip], str] = lambda clip: clip.caption,
                workers: int = 1) -> Path:
    """Write each clip as ``NNNN.mp4`` plus ``labels.jsonl`` (uri, start_s, end_s, caption and the factors);
    ``workers`` processes render and encode in parallel (the files are the same either way)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:04d}.mp4" for i in range(len(clips))]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            uris = list(pool.map(_write_clip, paths, clips, chunksize=16))
    else:
        uris = [_write_clip(path, clip) for path, clip in zip(paths, clips)]
    with open(directory / "labels.jsonl", "w") as f:
        for uri, clip in zip(uris, clips):
            f.write(json.dumps({**asdict(clip), "uri": uri, "start_s": 0.0, "end_s": clip.duration_s,
                                "caption": caption(clip)}) + "\n")
    return directory / "labels.jsonl"
