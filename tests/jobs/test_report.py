"""``reeltag report`` on the output of a real pipeline run: tiles, a failed file, actions, and a video moved away."""

from __future__ import annotations

import base64
import glob
import io
import os
import re
import shutil
import subprocess
import threading
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest

from jobs.cli import main
from jobs.report import write_report
from jobs.run import run_pipeline
from pipeline.config import load_spec
from pipeline.synth import Clip, render, write_video
from pipeline.writer import read_table

pytestmark = pytest.mark.slow  # the module's run starts an embedded Ray

BROKEN = 'odd <name> & "quotes".mp4'  # not a video; its name must come out escaped, never as markup
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr", "area", "base", "embed", "track"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_dir, vocab_file) -> Path:
    """A real run (embedded Ray) with tower levels [1, 2] and localised actions; then one video is moved away."""
    root = tmp_path_factory.mktemp("report")
    videos = root / "videos"
    videos.mkdir()
    for name, clip in (("clip0.mp4", Clip("red", "circle", "moving left", duration_s=3.0, width=96, height=64)),
                       ("tall.mp4", Clip("blue", "square", "growing", duration_s=2.0, width=64, height=80)),
                       ("gone.mp4", Clip("green", "triangle", "moving up", duration_s=2.0, width=96, height=64))):
        write_video(videos / name, render(clip), fps=clip.fps)
    (videos / BROKEN).write_text("not a video at all\n")
    config = root / "pipeline.yaml"
    config.write_text(f"""\
input: {{paths: ['{videos}']}}
segments: {{mode: window, window_s: 1.0, localize: true, scales_s: [1.0, 2.0]}}
sampling: {{frames: 2}}
tower: {{levels: [1, 2], fusion: mean, fine_frames: middle}}
model: {{family: clip, pretrained: '{tiny_clip_dir}', dtype: float32}}
tags: {{vocabulary: '{vocab_file}', top_k: 3, threshold: 0.01}}
output: {{dir: '{root / "out"}'}}
ray: {{num_cpus: 2}}
""")
    summary = run_pipeline(load_spec(config))
    assert (summary["videos_ok"], summary["videos_failed"]) == (3, 1)
    (videos / "gone.mp4").rename(root / "moved-away.mp4")
    return root / "out"


class _Page(HTMLParser):
    """Every start tag with its attributes, and a check that non-void elements are closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.open: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert page.open == [], f"unclosed elements: {page.open}"
    return page


def _segments(out: Path) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for row in read_table(out, "segments").to_pylist():
        by_name.setdefault(Path(row["uri"]).name, []).append(row)
    return {k: sorted(v, key=lambda r: (r["start_s"], r["end_s"])) for k, v in by_name.items()}


def _frame_at(path: Path, t: float, size: tuple[int, int]) -> np.ndarray:
    """The frame nearest ``t`` seconds, decoded independently of reeltag (every frame, plain PyAV)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    first = frames[0].time
    best = min(frames, key=lambda f: abs(f.time - first - t))
    return best.to_ndarray(width=size[0], height=size[1], format="rgb24")


def _jpeg_pixels(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_report_is_one_self_contained_file(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html" and path.stat().st_size > 0
    assert not [p for p in os.listdir(run_dir) if p.startswith(".report")], "temporary file left behind"
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    references = [(t, k, v) for t, a in page.tags for k, v in a.items() if k in ("src", "href", "srcset", "poster")]
    assert references and all(v.startswith("data:image/jpeg;base64,") for _, _, v in references), references
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert not re.search(r"https?:|file:|url\(|@import", text, re.I)


def test_report_shows_thumbnails_regions_timeline_actions_and_errors(run_dir):
    page = _parse(write_report(run_dir, run_dir / "elsewhere" / "r.html").read_text(encoding="utf-8"))
    segments = _segments(run_dir)
    assert sorted(segments) == ["clip0.mp4", "gone.mp4", "tall.mp4"]

    # one embedded JPEG per segment of the videos still there, at 96 px short side, showing that segment's frame
    images = page.all("img")
    assert len(images) == len(segments["clip0.mp4"]) + len(segments["tall.mp4"])
    for name in ("clip0.mp4", "tall.mp4"):
        alts = [a for a in images if a["alt"].startswith(name)]
        assert len(alts) == len(segments[name])
        for img, row in zip(alts, segments[name]):
            pixels = _jpeg_pixels(base64.b64decode(img["src"].split(",", 1)[1]))
            assert min(pixels.shape[:2]) == 96 and (pixels.shape[1], pixels.shape[0]) == (int(img["width"]),
                                                                                          int(img["height"]))
            times = row["frame_times_s"]
            truth = _frame_at(Path(row["uri"]), times[len(times) // 2], (pixels.shape[1], pixels.shape[0]))
            assert np.abs(pixels.astype(int) - truth).mean() < 6, f"{name} at {times}: not the segment's frame"
    assert int(images[0]["height"]) == 96 and int(images[-1]["width"]) == 96  # landscape clip0, portrait tall

    # the moved video: a placeholder per segment, with the reason, and the report went on
    placeholders = page.all("div", "missing")
    assert len(placeholders) == len(segments["gone.mp4"])
    assert all("not_found" in p["title"] or "No such file" in p["title"] for p in placeholders)

    # region tags as boxes at the tiles' normalised coordinates, over the frames (a placeholder has no aspect)
    boxes = page.all("div", "box")
    regions = [t for name in ("clip0.mp4", "tall.mp4") for r in segments[name] for t in r["region_tags"]]
    assert len(regions) > 0 and len(boxes) == len(regions)
    x0, y0, x1, y1 = (v * 100 for v in regions[0]["box"])
    assert any(f"left:{x0:.2f}%;top:{y0:.2f}%;width:{x1 - x0:.2f}%;height:{y1 - y0:.2f}%" in b["style"] for b in boxes)

    # the timeline: a row per label, a shaded cell per tagged segment, with the score as its tooltip
    text = "".join(page.text)
    labels = {t["label"] for rows in segments.values() for r in rows for t in r["tags"]}
    assert labels and all(label in text for label in labels)
    row = segments["clip0.mp4"][0]
    tag = row["tags"][0]
    shaded = [c for c in page.all("td") if f"rgba(9,105,218,{tag['score']:.3f})" in c.get("style", "")]
    assert any(f"{tag['label']} · 0.0 s–{row['end_s']:.1f} s · score {tag['score']:.3f}" in c["title"] for c in shaded)

    # actions (segments.localize) and the errors row, escaped
    assert "Actions" in text and read_table(run_dir, "actions").num_rows > 0
    (error,) = read_table(run_dir, "errors").to_pylist()
    assert error["uri"] in text and error["error_type"] in text and error["message"] in text
    raw = (run_dir / "elsewhere" / "r.html").read_text(encoding="utf-8")
    assert escape(error["uri"]) in raw and BROKEN not in raw
    assert "<span><b>4</b> videos</span>" in raw and "<span><b>1</b> errors</span>" in raw


def test_a_video_that_hangs_the_decoder_costs_only_its_pictures(run_dir, monkeypatch):
    """A FIFO where a video was: opening it blocks forever. The report's decoder child is stopped after
    DECODE_TIMEOUT_S without progress, that video gets placeholders saying so, and the others still get frames."""
    import jobs.report

    monkeypatch.setattr(jobs.report, "DECODE_TIMEOUT_S", 3.0)
    (uri,) = {row["uri"] for row in _segments(run_dir)["gone.mp4"]}
    os.mkfifo(uri)
    # the report runs in a thread, so that a regression (decoding in this process) fails here instead of hanging
    written = []
    writer = threading.Thread(target=lambda: written.append(write_report(run_dir, run_dir / "hang.html")),
                              daemon=True)
    writer.start()
    writer.join(120)
    try:
        assert not writer.is_alive(), "the report hung on a FIFO: thumbnails were not decoded in a child process"
    finally:
        if writer.is_alive():  # a writer end lets the reader blocked in open() go on
            os.close(os.open(uri, os.O_WRONLY | os.O_NONBLOCK))
        os.unlink(uri)
    page = _parse(written[0].read_text(encoding="utf-8"))
    segments = _segments(run_dir)
    placeholders = page.all("div", "missing")
    assert len(placeholders) == len(segments["gone.mp4"])
    assert all(p["title"].startswith("timeout: no progress for 3 s: decoder stopped") for p in placeholders)
    assert len(page.all("img")) == len(segments["clip0.mp4"]) + len(segments["tall.mp4"])


def test_cli_report_exit_codes(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html") and (tmp_path / "r.html").exists()
    assert main(["report", str(tmp_path)]) == 2  # as `reeltag search`: no such output
    assert "not a reeltag output directory" in capsys.readouterr().err
    (tmp_path / "empty" / "manifest").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no committed videos" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()  # the output path is a directory: cannot be written
    assert main(["report", str(run_dir), "--out", str(tmp_path / "taken")]) == 1
    assert "could not be written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    with pytest.raises(SystemExit) as usage:
        main(["report"])
    assert usage.value.code == 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell"):
        if shutil.which(name):
            return shutil.which(name)
    cache = os.environ.get("PLAYWRIGHT_BROWSERS_PATH", os.path.expanduser("~/.cache/ms-playwright"))
    found = sorted(glob.glob(f"{cache}/chromium*/chrome-linux*/chrome") +
                   glob.glob(f"{cache}/chromium_headless_shell*/chrome-*/headless_shell"))
    return found[-1] if found else None


def test_report_renders_in_headless_chromium(request, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on this machine: none of chromium, chromium-browser, google-chrome, "
                    "headless_shell on PATH nor a Playwright-installed one (Debian: apt-get install chromium)")
    path = write_report(request.getfixturevalue("run_dir"), tmp_path / "report.html")  # the run only when needed
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
                   capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("data:image/jpeg;base64,") == len(_parse(path.read_text()).all("img")) > 0
    assert "red circle" in dom and "unreadable" in dom
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (900, 1200)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours > 200, f"the screenshot has {colours} colours: the report did not render"
    assert ((np.abs(image.astype(int) - (9, 105, 218)).sum(axis=2) < 60).sum() > 0 or
            (image[..., 2].astype(int) - image[..., 0] > 40).sum() > 200), "no timeline shading on screen"
