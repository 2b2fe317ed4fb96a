"""``reeltag serve`` with real parts: the server started as a user starts it (a subprocess on 127.0.0.1), its API
over HTTP, a headless Chromium (Debian's, driven by Playwright) that searches, clicks a result and watches the
video play from the moment, and a bounded load test. The archive: a 20 s video with one action in its middle
written by the evaluation renderer through the ffmpeg CLI, an MPEG-4 Part 2 AVI (no browser plays it), and a
file that is not a video."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.demo import MODEL, VOCABULARY
from jobs.run import save_config
from pipeline.config import parse_spec
from pipeline.stages import run_sequential
from pipeline.writer import OutputWriter
from tests.conftest import REPO

httpx = pytest.importorskip("httpx")
http = httpx.Client(timeout=120)  # a first query loads the model (seconds on a busy machine)
sys.path.insert(0, str(REPO / "benchmarks"))
import eval_render  # noqa: E402

REELTAG = [sys.executable, "-m", "jobs.cli"]
CAPTION = "a red circle moving left"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def archive_out(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg CLI is not installed (make test installs it with apt-get)")
    root = tmp_path_factory.mktemp("serve")
    videos = root / "videos"
    scene = eval_render.Scene("red", "circle", "moving left", 480, 270, 25.0, 4.0, 0.3, 0, "noise", 0, True, 20, 5)
    eval_render.write_long(videos, [eval_render.LongVideo(20.0, [(9.0, scene)])])
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t", "6",
                    "-c:v", "mpeg4", str(videos / "old.avi")], check=True)
    (videos / "notes.mp4").write_text("not a video\n")
    out = root / "out"
    out.mkdir()
    spec = parse_spec(f"input: {{paths: ['{videos}']}}\nmodel: {{pretrained: '{MODEL}', local_files_only: true, "
                      f"dtype: float32}}\ntemporal: {{pooling: attention, checkpoint: '{MODEL}'}}\n"
                      f"sampling: {{frames: 3}}\nsegments: {{window_s: 4.0, stride_s: 1.0}}\n"
                      f"tags: {{vocabulary: '{VOCABULARY}', prompts: ['{{}}'], top_k: 3}}\noutput: {{dir: '{out}'}}\n")
    save_config(out, spec, "h")
    writer = OutputWriter(out, config_hash="h", model=spec.model_id())
    writer.add(run_sequential(spec, [str(videos / "long-00.mp4"), str(videos / "old.avi"),
                                     str(videos / "notes.mp4")]))
    writer.flush()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, out: Path | list[Path], *args: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        outs = [str(o) for o in (out if isinstance(out, list) else [out])]
        self.proc = subprocess.Popen([*REELTAG, "serve", *outs, "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"reeltag serve exited: {self.proc.stderr.read()}")
            try:
                http.get(f"{self.base}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError("reeltag serve did not start in 120 s")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(archive_out):
    running = Running(archive_out)
    yield running
    running.stop()


def _ids(base):
    videos = http.get(f"{base}/api/videos").json()["videos"]
    return {Path(v["uri"]).name: v for v in videos}


def test_search_over_http_is_the_cli_object(server, archive_out):
    got = http.get(f"{server.base}/api/search", params={"q": CAPTION, "top_k": 3})
    assert got.status_code == 200
    cli = subprocess.run([*REELTAG, "search", str(archive_out), CAPTION, "--top-k", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    api, printed = got.json(), json.loads(cli.stdout)
    assert set(api) == {"query", "took_ms", "results"} and api["query"] == printed["query"]
    assert api["results"] == printed["results"] and api["results"]
    best = api["results"][0]
    assert Path(best["uri"]).name == "long-00.mp4"
    assert best["start_s"] < 13.0 and best["end_s"] > 9.0  # the action is at 9-13 s of the 20 s video


def test_videos_segments_errors_like_image_and_filters(server):
    videos = _ids(server.base)
    assert videos["long-00.mp4"]["status"] == "ok" and videos["old.avi"]["status"] == "ok"
    assert videos["notes.mp4"]["status"] == "failed" and videos["notes.mp4"]["errors"][0]["stage"] == "decode"
    errors = http.get(f"{server.base}/api/errors").json()["errors"]
    assert [Path(e["uri"]).name for e in errors] == ["notes.mp4"]
    long_id = videos["long-00.mp4"]["video_id"]
    detail = http.get(f"{server.base}/api/videos/{long_id}").json()
    assert detail["playable"] is True and len(detail["segments"]) == 17  # 4 s windows, 1 s apart, over 20 s
    assert all(s["tags"] for s in detail["segments"])
    assert http.get(f"{server.base}/api/videos/{videos['old.avi']['video_id']}").json()["playable"] is False
    like = http.get(f"{server.base}/api/search", params={"like": f"{long_id}:9", "top_k": 2}).json()
    assert like["query"]["like"] == f"{long_id}:9" and all(r["segment_id"] != 9 or r["start_s"] != 9.0
                                                           for r in like["results"])
    avi = videos["old.avi"]["uri"]
    only = http.get(f"{server.base}/api/search", params={"q": CAPTION, "video": avi, "top_k": 5}).json()
    assert only["query"]["video"] == avi and only["results"] and {r["uri"] for r in only["results"]} == {avi}
    after = http.get(f"{server.base}/api/search", params={"q": CAPTION, "after": 10, "top_k": 50}).json()
    assert after["results"] and all(r["start_s"] >= 10 for r in after["results"])  # moments too
    thumb = http.get(f"{server.base}/media/{long_id}/thumbnail.jpg", params={"t": 11})
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    image = http.post(f"{server.base}/api/search/image", params={"top_k": 2}, content=thumb.content)
    assert image.status_code == 200 and image.json()["query"]["image"] == "upload" and image.json()["results"]
    timeline = http.get(f"{server.base}/api/videos/{long_id}/timeline").text
    assert 'class="timeline"' in timeline and CAPTION in timeline  # the report's own timeline


def test_media_range_requests_and_previews(server, archive_out):
    videos = _ids(server.base)
    long_id, avi_id = videos["long-00.mp4"]["video_id"], videos["old.avi"]["video_id"]
    part = http.get(f"{server.base}/media/{long_id}", headers={"Range": "bytes=100-199"})
    size = os.path.getsize(videos["long-00.mp4"]["uri"])
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-199/{size}"
    assert part.content == Path(videos["long-00.mp4"]["uri"]).read_bytes()[100:200]
    preview = http.get(f"{server.base}/media/{avi_id}/preview.mp4", params={"start": 1, "end": 3}, timeout=120)
    assert preview.status_code == 200 and preview.content[4:8] == b"ftyp"
    cached = list((archive_out / "serve-cache").glob("preview-*.mp4"))
    assert len(cached) == 1  # made once, inside the output directory
    import av

    with av.open(str(cached[0])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and 40 <= stream.frames <= 60  # 2 s at 25 fps


def test_errors_are_json_and_only_indexed_files_are_served(server):
    for path, status in (("/api/search?q=x&top_k=0", 400), ("/api/search", 400), ("/api/videos/nope", 404),
                         ("/media/nope", 404), ("/media/..%2F..%2Fetc%2Fpasswd", 404),
                         ("/media/%2Fetc%2Fpasswd", 404), ("/static/../../pyproject.toml", 404),
                         ("/api/search?q=x&after=abc", 400), ("/api/search?q=x&tag=nothing", 400),
                         ("/nowhere", 404)):
        got = http.get(server.base + path)
        assert got.status_code == status, (path, got.status_code, got.text)
        assert got.headers["content-type"].startswith("application/json") and got.json()["error"], path
        assert "Traceback" not in got.text
    assert http.post(f"{server.base}/api/search/image", content=b"not an image").status_code == 400


def test_a_token_guards_the_api_and_media(archive_out):
    running = Running(archive_out, "--token", "s3cret")
    try:
        assert http.get(f"{running.base}/api/videos").status_code == 401
        assert http.get(f"{running.base}/api/videos", params={"token": "wrong"}).status_code == 401
        assert http.get(f"{running.base}/api/videos", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get(f"{running.base}/api/videos", params={"token": "s3cret"}).status_code == 200
        assert http.get(f"{running.base}/").status_code == 200  # the page holds no data
    finally:
        running.stop()
    assert "127.0.0.1" in running.proc.stdout.read()  # the default address: this machine only


def test_two_output_directories_are_served_each_by_name(archive_out, tmp_path):
    """One server, two outputs (the second a copy of the first, its index left behind): each searched by name."""
    other = tmp_path / "second"
    shutil.copytree(archive_out, other, ignore=shutil.ignore_patterns("serve-cache", "index*"))
    running = Running([archive_out, other])
    try:
        names = [a["name"] for a in http.get(f"{running.base}/api/archives").json()["archives"]]
        assert names == [archive_out.name, "second"]
        for name in names:
            found = http.get(f"{running.base}/api/search", params={"q": CAPTION, "top_k": 1, "archive": name})
            assert found.status_code == 200 and Path(found.json()["results"][0]["uri"]).name == "long-00.mp4"
        missing = http.get(f"{running.base}/api/videos", params={"archive": "third"})
        assert missing.status_code == 404 and "second" in missing.json()["error"]
    finally:
        running.stop()


def test_load_20_clients_x_50_queries(server):
    """Bounded (1,000 queries over loopback, 120 s at most) with zero errors; p50/p95 printed for the README."""
    import asyncio

    queries = ["a red circle moving left", "a blue square growing", "a green triangle moving up",
               "a yellow circle shrinking", "a red square moving down"]

    async def client(i: int, http, latencies: list, failures: list):
        for k in range(50):
            started = time.perf_counter()
            got = await http.get(f"{server.base}/api/search", params={"q": queries[(i + k) % 5], "top_k": 5})
            latencies.append(time.perf_counter() - started)
            if got.status_code != 200 or not got.json()["results"]:
                failures.append(got.status_code)

    async def main():
        latencies, failures = [], []
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as http:
            await asyncio.wait_for(asyncio.gather(*(client(i, http, latencies, failures) for i in range(20))), 120)
        return latencies, failures

    started = time.perf_counter()
    latencies, failures = asyncio.run(main())
    wall = time.perf_counter() - started
    latencies.sort()
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    print(f"\nload: 20 clients x 50 queries, {len(latencies)} answered in {wall:.1f} s "
          f"({len(latencies) / wall:.0f}/s): p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, {len(failures)} errors")
    assert len(latencies) == 1000 and failures == []


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: make test installs it with apt-get")
def test_a_browser_finds_the_moment_and_plays_it_from_its_start(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.base + "/")
            page.fill("#q", CAPTION)
            page.keyboard.press("Enter")  # the keyboard alone
            first = page.locator("#results .card").first
            first.wait_for(timeout=60_000)
            page.wait_for_function("() => { const i = document.querySelector('#results .card img'); "
                                   "return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
            start = float(first.get_attribute("data-start"))
            assert 6.0 <= start <= 13.0
            first.focus()
            page.keyboard.press("Enter")
            page.wait_for_function("() => { const v = document.getElementById('video'); "
                                   "return v.readyState >= 2 && !v.seeking && !v.paused; }", timeout=60_000)
            at = page.evaluate("() => document.getElementById('video').currentTime")
            assert abs(at - start) <= 0.5, (at, start)
            page.wait_for_timeout(700)
            later = page.evaluate("() => document.getElementById('video').currentTime")
            assert later > at  # it plays
            assert page.locator("#timeline table.timeline").count() == 1
            shot = Path(os.environ.get("REELTAG_SCREENSHOT", tmp_path / "serve.png"))
            page.evaluate("() => document.getElementById('video').pause()")
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 10_000
            page.locator("#results .card button").first.click()  # more like this
            page.wait_for_function("() => document.getElementById('status').textContent.includes('moments like')",
                                   timeout=60_000)
            assert page.locator("#results .card").count() > 0
            page.click("#show-errors")
            page.locator("#errors tbody tr").first.wait_for(timeout=30_000)
            assert "notes.mp4" in page.locator("#errors tbody").inner_text()
            # an MPEG-4 Part 2 AVI: no browser plays it, the page plays a preview of the moment made on the server
            page.click("#filters summary")
            page.fill("#f-video", _ids(server.base)["old.avi"]["uri"])
            page.fill("#q", CAPTION)
            page.keyboard.press("Enter")
            page.wait_for_function("() => document.getElementById('status').textContent.includes('moments for')",
                                   timeout=60_000)
            page.locator("#results .card").first.click()
            page.wait_for_function("() => { const v = document.getElementById('video'); "
                                   "return v.src.includes('preview.mp4') && v.readyState >= 2 && !v.paused "
                                   "&& v.currentTime > 0.2; }", timeout=120_000)
            assert "preview" in page.locator("#player-note").inner_text()
            phone = browser.new_page(viewport={"width": 390, "height": 800})  # a phone-width window
            phone.goto(server.base + "/")
            assert phone.evaluate("() => document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()
