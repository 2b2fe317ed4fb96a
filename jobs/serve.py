"""``reeltag serve``: the archive in a browser. A JSON API and one static page over one or more output directories.

Built on Starlette (routing, range-request file responses, a thread pool for blocking work) served by uvicorn:
both small, maintained and without a build step. Each output directory is an :class:`Archive`: its search index
and models are opened once and re-opened only when the output's shard listing changes. Everything a request can
reach is looked up by id in what the output indexed: a video is served because the index lists it, never because
a request named a path. Every error is a JSON body ``{"error": message}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from jobs.search import NO_FILTERS, Filters, Index, SearchError, _listing, build_index, search
from pipeline.writer import committed_rows, latest_config, read_table

STATIC = Path(__file__).resolve().parent / "static"
RECHECK_S = 5.0  # an archive looks for new commits at most this often
PLAYABLE_CODECS = {  # what browsers play: FFmpeg demuxer name -> codecs
    "mov,mp4,m4a,3gp,3g2,mj2": ("h264", "av1", "vp9"), "matroska,webm": ("vp8", "vp9", "av1")}
PREVIEW_MAX_S = 60.0  # a preview covers at most this much of a moment
MAX_UPLOAD = 20 << 20  # bytes of an image upload
THUMB_PX = 160


class ApiError(Exception):
    """A request the API cannot answer: its status and one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Archive:
    """One output directory as the server sees it."""

    name: str
    out: Path
    index: Index | None = None
    listing: str = ""
    checked: float = 0.0
    models: dict = field(default_factory=dict)
    _segments: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> Index:
        """The index, brought up to date when the output's listing changed (looked at every RECHECK_S at most)."""
        with self.lock:
            now = time.monotonic()
            if self.index is None or now - self.checked > RECHECK_S:
                listing = _listing(self.out)
                if self.index is None or listing != self.listing:
                    self.index, self.listing = build_index(self.out), listing
                self.checked = now
            return self.index

    def video(self, video_id: str) -> tuple[int, str]:
        """(row in the index's videos, uri) of a committed video; 404 for any other id."""
        ids = self.current().videos["video_id"].to_pylist()
        if video_id not in ids:
            raise ApiError(404, f"no video {video_id!r} in {self.name}")
        i = ids.index(video_id)
        return i, self.current().videos["uri"][i].as_py()

    def segments(self, video_id: str) -> list[dict]:
        """The video's committed segment rows (no embeddings), in time order: only the shards of its commit are
        read, and once per commit listing (the page asks for every result it shows)."""
        self.video(video_id)
        key = (self.listing, video_id)
        if key not in self._segments:
            columns = ["segment_id", "start_s", "end_s", "frame_times_s", "tags", "region_tags", "uri", "backend"]
            rows = [r for _, t in committed_rows(self.out, "segments", self.current().config_hash,
                                                 videos={video_id}, columns=columns)
                    for r in t.select(columns).to_pylist()]
            if len(self._segments) > 1024:
                self._segments.clear()
            self._segments[key] = sorted(rows, key=lambda r: r["start_s"])
        return self._segments[key]


class Server:
    """The state behind the app: archives, the thumbnail and preview makers, the token."""

    def __init__(self, outputs: list[str | Path], token: str | None = None):
        self.archives: dict[str, Archive] = {}
        for out in outputs:
            out = Path(out).resolve()
            name = out.name
            while name in self.archives:
                name = f"{name}-{len(self.archives)}"
            self.archives[name] = Archive(name, out)
        self.token = token
        self._thumbs: dict[tuple, bytes] = {}
        self._playable: dict[tuple, tuple[str, str]] = {}
        self._locks = {"thumbnail": threading.Lock(), "preview": threading.Lock()}
        self._decoders: dict = {}

    def archive(self, name: str | None) -> Archive:
        if name is None:
            return next(iter(self.archives.values()))
        if name not in self.archives:
            raise ApiError(404, f"no archive {name!r} (archives: {', '.join(self.archives)})")
        return self.archives[name]

    # ---- the API's answers (plain data; the routes below turn them into responses)

    def search(self, params: dict, image: bytes | None = None) -> dict:
        archive = self.archive(params.get("archive"))
        top_k = _int(params, "top_k", 10, low=1, high=1000)
        filters = Filters(video=params.get("video"), tag=params.get("tag"), region=params.get("region"),
                          min_confidence=_float(params, "min_confidence", 0.0),
                          after=_float(params, "after", None), before=_float(params, "before", None))
        text, like = params.get("q"), params.get("like")
        if image is None and not text and not like:
            raise ApiError(400, "q: required (the text to search for), or like=VIDEO_ID:SEGMENT_ID, or POST an image")
        try:
            return search(archive.out, None if image is not None or like else text, image=image,
                          like_segment=None if image is not None else like, top_k=top_k,
                          filters=filters if filters else NO_FILTERS, index=archive.current(),
                          models=archive.models)
        except SearchError as e:
            raise ApiError(400 if "--" in str(e) or "give exactly" in str(e) else 404, str(e)) from None

    def videos(self, params: dict) -> dict:
        archive = self.archive(params.get("archive"))
        manifest = read_table(archive.out, "manifest")
        latest = latest_config(archive.out)
        rows = manifest.filter(pc.equal(manifest["config_hash"], latest[0])).to_pylist() if latest else []
        errors = read_table(archive.out, "errors", latest[0]).to_pylist() if latest else []
        by_video: dict[str, list] = {}
        for e in errors:
            by_video.setdefault(e["video_id"], []).append({k: e[k] for k in ("stage", "error_type", "message")})
        videos = [{"video_id": r["video_id"], "uri": r["uri"], "name": os.path.basename(r["uri"]),
                   "status": r["status"], "segments": r["n_segments"], "errors": by_video.get(r["video_id"], [])}
                  for r in sorted(rows, key=lambda r: r["uri"])]
        return {"archive": archive.name, "config_hash": latest[0] if latest else None, "videos": videos}

    def errors(self, params: dict) -> dict:
        archive = self.archive(params.get("archive"))
        latest = latest_config(archive.out)
        rows = read_table(archive.out, "errors", latest[0]).to_pylist() if latest else []
        return {"archive": archive.name, "errors": [{k: r[k] for k in ("video_id", "uri", "stage", "error_type",
                                                                        "message")} for r in rows]}

    def video(self, video_id: str, params: dict) -> dict:
        archive = self.archive(params.get("archive"))
        _, uri = archive.video(video_id)
        rows = archive.segments(video_id)
        return {"archive": archive.name, "video_id": video_id, "uri": uri, "name": os.path.basename(uri),
                "playable": self.playable(uri),
                "segments": [{k: r[k] for k in ("segment_id", "start_s", "end_s", "tags", "region_tags")}
                             for r in rows]}

    def timeline(self, video_id: str, params: dict) -> str:
        """The report's own timeline of the video's tags (jobs.report._timeline), as an HTML fragment."""
        from jobs.report import _timeline

        archive = self.archive(params.get("archive"))
        return _timeline(archive.segments(video_id))

    def playable(self, uri: str) -> bool:
        """Whether a browser plays the file as it is (MP4 with H.264/AV1/VP9, WebM with VP8/VP9/AV1): read from the
        container's header once per file version (the page asks for every result it shows)."""
        import av

        from pipeline.decode import open_container
        from pipeline.sources import local_path

        try:
            with local_path(uri) as path:
                key = (path, os.stat(path).st_mtime_ns)
                if key not in self._playable:
                    with open_container(path) as container:
                        stream = container.streams.video[0]
                        self._playable[key] = (container.format.name, stream.codec_context.name)
        except (OSError, IndexError, av.FFmpegError):  # moved, unreadable, no video: not playable
            return False
        container, codec = self._playable[key]
        return container in PLAYABLE_CODECS and codec in PLAYABLE_CODECS[container]

    def thumbnail(self, video_id: str, params: dict) -> bytes:
        archive = self.archive(params.get("archive"))
        _, uri = archive.video(video_id)
        at = round(_float(params, "t", 0.0), 2)
        key = (archive.name, video_id, at)
        if key not in self._thumbs:
            result = self._isolated("thumbnail", uri, [at], THUMB_PX)
            if "failure" in result:
                raise ApiError(404, f"no frame of {video_id} at {at} s: {result['failure']}")
            if len(self._thumbs) > 4096:
                self._thumbs.clear()
            self._thumbs[key] = result["images"][0][0]
        return self._thumbs[key]

    def media_path(self, video_id: str, params: dict) -> Path:
        """The video file itself (for range requests), if it is a local file the index lists."""
        archive = self.archive(params.get("archive"))
        _, uri = archive.video(video_id)
        path = Path(uri[7:] if uri.startswith("file://") else uri)
        if "://" in uri[:12] and not uri.startswith("file://") or not path.is_file():
            raise ApiError(404, f"the video {video_id} is not a local file this server can read ({uri})")
        return path

    def preview(self, video_id: str, params: dict) -> Path:
        """A short H.264 MP4 of ``start``..``end`` (seconds from the first frame), made once with PyAV and cached in
        ``OUT/serve-cache/`` (inside the output directory): for files a browser cannot play."""
        archive = self.archive(params.get("archive"))
        _, uri = archive.video(video_id)
        start = max(0.0, _float(params, "start", 0.0))
        end = _float(params, "end", start + 10.0)
        if end <= start:
            raise ApiError(400, f"end: must be after start ({start} s), got {end}")
        end = min(end, start + PREVIEW_MAX_S)
        digest = hashlib.sha256(json.dumps([video_id, round(start, 2), round(end, 2)]).encode()).hexdigest()[:20]
        cache = archive.out / "serve-cache"
        target = cache / f"preview-{digest}.mp4"
        if not target.exists():
            cache.mkdir(exist_ok=True)
            result = self._isolated("preview", uri, start, end, str(target))
            if "failure" in result:
                raise ApiError(422, f"no preview of {video_id} from {start:g} s to {end:g} s: {result['failure']}")
        return target

    def _isolated(self, kind: str, *args) -> dict:
        """Decoding in a child process (as ``reeltag run`` and the report do): a file that hangs or crashes the
        decoder fails its own request only. One child per kind, one request at a time each."""
        from jobs._preview import preview_rows
        from jobs.report import DECODE_TIMEOUT_S, _thumbnail_rows
        from pipeline._isolate import IsolatedDecoder

        with self._locks[kind]:
            if kind not in self._decoders:
                fn = _thumbnail_rows if kind == "thumbnail" else preview_rows
                self._decoders[kind] = IsolatedDecoder(fn, timeout_s=DECODE_TIMEOUT_S, recycle_after=200)
            (result,) = self._decoders[kind].run(*args, on_fail=lambda k, message, _: {"failure": f"{k}: {message}"})
            return result


def _int(params: dict, key: str, default: int, *, low: int, high: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{key}: expected a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise ApiError(400, f"{key}: must be between {low} and {high}, got {number}")
    return number


def _float(params: dict, key: str, default):
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, f"{key}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ApiError(400, f"{key}: expected a finite number, got {value!r}")
    return number


def create_app(server: Server):
    """The Starlette app: ``/api/...`` (JSON), ``/media/...`` (video files, previews, thumbnails), the page."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    class TokenCheck:
        """With ``--token``, every API and media request carries it: ``Authorization: Bearer T`` or ``?token=T``
        (a ``<video src>`` cannot send headers). The page itself holds no data and needs none."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and server.token and scope["path"].startswith(("/api/", "/media/")):
                request = Request(scope)
                given = request.query_params.get("token") or request.headers.get("authorization", "")[7:]
                if not given or not _same(given, server.token):
                    response = JSONResponse({"error": "a token is required: Authorization: Bearer TOKEN or "
                                                      "?token=TOKEN"}, status_code=401)
                    await response(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    def params(request: Request) -> dict:
        return {k: v for k, v in request.query_params.items() if k != "token"}

    def json_route(fn):
        async def endpoint(request: Request):
            return JSONResponse(await run_in_threadpool(fn, request))
        return endpoint

    async def search_get(request: Request):
        return JSONResponse(await run_in_threadpool(server.search, params(request)))

    async def search_image(request: Request):
        body = await request.body()
        if not body:
            raise ApiError(400, "the request body must be the image's bytes (PNG, JPEG, WebP, …)")
        if len(body) > MAX_UPLOAD:
            raise ApiError(413, f"the image is {len(body)} bytes; at most {MAX_UPLOAD}")
        return JSONResponse(await run_in_threadpool(server.search, params(request), body))

    async def thumbnail(request: Request):
        jpeg = await run_in_threadpool(server.thumbnail, request.path_params["video_id"], params(request))
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    async def media(request: Request):
        path = await run_in_threadpool(server.media_path, request.path_params["video_id"], params(request))
        return FileResponse(path, media_type=_media_type(path))

    async def preview(request: Request):
        path = await run_in_threadpool(server.preview, request.path_params["video_id"], params(request))
        return FileResponse(path, media_type="video/mp4")

    async def timeline(request: Request):
        html = await run_in_threadpool(server.timeline, request.path_params["video_id"], params(request))
        return HTMLResponse(html)

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def report_css(request: Request):
        from jobs.report import _CSS

        return Response(_CSS, media_type="text/css")

    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def search_error(request: Request, exc: SearchError):  # an output with nothing committed yet, …
        return JSONResponse({"error": str(exc)}, status_code=404)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail or "not found"}, status_code=exc.status_code)

    async def crash(request: Request, exc: Exception):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JSONResponse({"error": f"internal error: {type(exc).__name__}{': ' + first if first else ''}"},
                            status_code=500)

    routes = [
        Route("/", page),
        Route("/api/archives", json_route(lambda r: {"archives": [
            {"name": a.name, "path": str(a.out)} for a in server.archives.values()]})),
        Route("/api/search", search_get),
        Route("/api/search/image", search_image, methods=["POST"]),
        Route("/api/videos", json_route(lambda r: server.videos(params(r)))),
        Route("/api/errors", json_route(lambda r: server.errors(params(r)))),
        Route("/api/videos/{video_id}", json_route(lambda r: server.video(r.path_params["video_id"], params(r)))),
        Route("/api/videos/{video_id}/timeline", timeline),
        Route("/media/{video_id}/thumbnail.jpg", thumbnail),
        Route("/media/{video_id}/preview.mp4", preview),
        Route("/media/{video_id}", media),
        Route("/report.css", report_css),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck)],
                     exception_handlers={ApiError: api_error, SearchError: search_error, HTTPException: http_error,
                                         Exception: crash})


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _media_type(path: Path) -> str:
    return {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
            ".mkv": "video/x-matroska"}.get(path.suffix.lower(), "application/octet-stream")


def serve(outputs: list[str], *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None) -> None:
    """Run the server until interrupted; the archives' indexes are brought up to date before it listens."""
    import uvicorn

    server = Server(outputs, token)
    for archive in server.archives.values():
        archive.current()
    print(f"reeltag serve: {', '.join(str(a.out) for a in server.archives.values())} on http://{host}:{port}/"
          + ("  (token required)" if token else ""), flush=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
