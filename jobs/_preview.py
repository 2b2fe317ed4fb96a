"""Short H.264 previews of a moment, for videos a browser cannot play (HEVC, MPEG-4 Part 2, MPEG-2, AVI, …).

Frames are read exactly (the decoder ``reeltag run`` uses, by time from the first frame), at most 25 a second and
360 px on the short side, and written with PyAV's libx264 to an MP4 a browser plays from its first frame. Runs in
the server's decoder child process, so a file that hangs or crashes the decoder costs only its preview.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

PREVIEW_FPS = 25.0
PREVIEW_SHORT_SIDE = 360


def preview_rows(uri: str, start_s: float, end_s: float, target: str):
    """Decoder child: one row, ``{"path"}`` of the preview written, or ``{"failure"}``."""
    try:
        write_preview(uri, start_s, end_s, Path(target))
        yield {"path": target}
    except Exception as e:  # noqa: BLE001 - the request gets the reason, the server goes on
        yield {"failure": f"{type(e).__name__}: {e}"}


def write_preview(uri: str, start_s: float, end_s: float, target: Path) -> Path:
    import av

    from pipeline.decode import decode_size, open_video, probe
    from pipeline.sources import local_path

    with local_path(uri) as path:
        info, index = probe(path)
        times = index.times_s
        wanted = np.flatnonzero((times >= start_s) & (times < end_s))
        if len(wanted) == 0:
            raise ValueError(f"no frame between {start_s:g} s and {end_s:g} s (the video has {times[-1]:.2f} s)")
        step = max(1, round(len(wanted) / max(1.0, (end_s - start_s) * PREVIEW_FPS)))
        wanted = wanted[::step]
        reader = open_video(path, info, index, decode_size(info, PREVIEW_SHORT_SIDE), backend="pyav",
                            requested="pyav")
        try:
            frames = reader.read(wanted)
        finally:
            reader.close()
    fps = Fraction(len(wanted), 1) / Fraction(max(end_s - start_s, 1e-3)).limit_denominator(1000)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    height, width = (frames.shape[1] // 2) * 2, (frames.shape[2] // 2) * 2
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps.limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[:height, :width]), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, target)
    return target
