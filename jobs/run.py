"""``reeltag run``: the tagging pipeline as one streaming Ray Data job, written by the driver as it streams, on an
embedded local Ray by default or an existing cluster with ``ray.address`` or RAY_ADDRESS."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pyarrow as pa

from pipeline.config import PipelineSpec, RaySpec
from pipeline.decode import video_id
from pipeline.sources import stat
from pipeline.stages import DecodeStage, EncodeStage
from pipeline.validate import check_spec, config_hash, resolved
from pipeline.writer import OutputWriter, output_lock, read_table, write_actions
from temporal.files import write_text_atomic
from temporal.localize import localize_videos


class RayStartError(RuntimeError):
    """Ray could not be started or reached."""


@contextmanager
def ray_session(spec: RaySpec) -> Iterator[ModuleType]:
    """Connect (or start), quiet Ray's own output unless ``ray.verbose``, and shut down on exit."""
    import ray

    level = logging.INFO if spec.verbose else logging.ERROR
    address = spec.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, log_to_driver=spec.verbose, logging_level=level)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:  # embedded: a new local Ray owned by this job, never one a crashed run left behind
            ray.init(address="local", num_cpus=spec.num_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
        raise RayStartError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}") from None
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = spec.verbose
    ctx.print_on_execution_start = spec.verbose
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(level)
    try:
        yield ray
    finally:
        ray.shutdown()


class PlanError(ValueError):
    """The Ray resource plan cannot run on the cluster it got (it would wait for ever); says what to change."""


def fit_plan(spec: RaySpec, cpus: float, gpus: float) -> RaySpec:
    """``spec`` with the CPUs of a decode task and of an encoder actor fixed so that the encoder actors leave room
    for at least one decode task on ``cpus``; PlanError for a plan that cannot (or GPUs it cannot have)."""
    actors = spec.encoder_actors
    if actors * spec.gpus_per_actor > gpus:
        raise PlanError(f"ray: {actors} encoder actors x ray.gpus_per_actor {spec.gpus_per_actor:g} need "
                        f"{actors * spec.gpus_per_actor:g} GPUs; the cluster has {gpus:g}")
    decode, encoder = spec.decode_cpus, spec.encoder_cpus
    if decode is None and encoder is None:
        decode = encoder = 1.0 if cpus >= actors + 1 else cpus / (actors + 1)
    elif encoder is None:
        encoder = min(1.0, (cpus - decode) / actors)
    elif decode is None:
        decode = min(1.0, cpus - actors * encoder)
    if decode <= 0 or encoder <= 0 or actors * encoder + decode > cpus + 1e-9:
        raise PlanError(f"ray: {actors} encoder actors x {encoder:g} CPUs and a decode task of {max(decode, 0):g} "
                        f"CPUs need more than the cluster's {cpus:g} CPUs (the job "
                        "would wait for ever): lower ray.encoder_actors, ray.encoder_cpus or ray.decode_cpus, or "
                        "leave them null to fit")
    return dataclasses.replace(spec, decode_cpus=decode, encoder_cpus=encoder)


class Unschedulable(PlanError):
    """A stage waited ``ray.unschedulable_s`` for resources Ray could not give it, after the job had started."""


class Watchdog:
    """Watches, from a thread on the driver, for a stage Ray cannot schedule once the job runs (a node lost, the
    cluster taken by other jobs): Ray holding a request shaped like a decode task or an encoder actor pending, no
    row reaching the driver, for ``ray.unschedulable_s``. Then :class:`Unschedulable` is raised in the driver's
    loop (by a signal: the loop may be blocked in Ray). Reads Ray's own scheduler state (the GCS), which the
    embedded Ray has too; no dashboard needed. Inactive off the main thread, where no signal handler can be set."""

    SIGNAL = signal.SIGUSR1

    def __init__(self, ray: ModuleType, spec: RaySpec, *, interval_s: float = 2.0):
        self.ray, self.spec, self.interval_s = ray, spec, interval_s
        self.verdict: str | None = None
        self.last_row = time.monotonic()
        self._since: dict[str, float] = {}  # stage -> when its request was first seen pending
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="reeltag-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.spec.unschedulable_s is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.SIGNAL, self._raise)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            signal.signal(self.SIGNAL, self._previous)

    def _raise(self, signum, frame) -> None:
        if self.verdict is not None and not self._stop.is_set():
            raise Unschedulable(self.verdict)

    def rows_arrived(self) -> None:
        self.last_row = time.monotonic()

    def waiting(self) -> dict[str, str]:
        """Stage -> what it asks for, for each stage Ray holds a request of pending now."""
        from ray._private.state import state
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(self.ray.get_runtime_context().gcs_address)
        pending = [b.bundle for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
        encoders = [a["State"] for a in state.actor_table(None).values()
                    if "(_RayEncode)" in a["ActorClassName"]]
        shapes = {"decode": (self.spec.decode_cpus, 0.0),
                  "encode": (self.spec.encoder_cpus, self.spec.gpus_per_actor)}
        waiting = {}
        for stage, (cpus, gpus) in shapes.items():
            if stage == "encode" and all(state == "ALIVE" for state in encoders):
                continue  # every encoder actor runs: a request of the same shape is a decode task's
            if any(abs(b.get("CPU", 0) - cpus) < 1e-6 and abs(b.get("GPU", 0) - gpus) < 1e-6 for b in pending):
                kind = "an encoder actor" if stage == "encode" else "a decode task"
                waiting[stage] = f"{kind} of {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        if waiting:
            free = {}
            for node in status.active_nodes:
                for u in node.resource_usage.usage:
                    total, used = free.get(u.resource_name, (0.0, 0.0))
                    free[u.resource_name] = (total + u.total, used + u.used)
            room = ", ".join(f"{t - u:g} of {t:g} {name}s" for name, (t, u) in sorted(free.items())
                             if name in ("CPU", "GPU"))
            waiting = {stage: f"{what} (free now: {room or 'nothing'})" for stage, what in waiting.items()}
        return waiting

    def _watch(self) -> None:
        limit = self.spec.unschedulable_s
        while not self._stop.wait(self.interval_s):
            try:
                waiting = self.waiting()
            except Exception:  # noqa: BLE001 - the GCS busy or going away: look again
                continue
            now = time.monotonic()
            self._since = {stage: self._since.get(stage, now) for stage in waiting}
            for stage, what in waiting.items():
                if now - max(self._since[stage], self.last_row) >= limit:
                    self.verdict = (f"ray: the {stage} stage has waited {limit:g} s for {what} that Ray cannot "
                                    "place: a node was lost or the cluster is busy with other jobs; what was "
                                    "committed is kept, run again when it has room (ray.unschedulable_s)")
                    signal.pthread_kill(threading.main_thread().ident, self.SIGNAL)
                    return


class JobError(RuntimeError):
    """The job itself could not run: its output directory is not writable."""


def check_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise JobError(f"output.dir {path!r} is not writable: {e.strerror or e}") from None
    return out


def fingerprint(uri: str) -> str:
    try:
        size, mtime = stat(uri)
    except (OSError, ValueError):
        return "missing"  # the decode stage records why
    return f"{size}:{mtime}"


class _RayEncode:
    """Ray actor wrapper: build the stage and load weights once per actor."""

    def __init__(self, stage: EncodeStage):
        import ray

        self.stage = stage
        self.stage.setup()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        table = self.stage(batch)
        return table.set_column(table.schema.get_field_index("encoder_node"), "encoder_node",
                                pa.array([self.node] * table.num_rows, pa.string()))


@dataclass
class Progress:
    """One line on stderr: videos done/total, segments/s and ETA (rewritten in place on a terminal)."""

    total: int
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0

    def update(self, done: int, segments: int, *, final: bool = False) -> None:
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if not final and now - self.last < (0.5 if tty else 10.0):
            return
        self.last, elapsed = now, now - self.started
        rate = segments / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) * elapsed / done if done else float("nan")
        line = f"videos {done}/{self.total} · segments {segments} · {rate:.1f} seg/s · ETA {_fmt_s(eta)}"
        print(("\r" if tty else "") + line, end="\n" if final or not tty else "", file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    return "--" if s != s else f"{int(s) // 60}m{int(s) % 60:02d}s" if s >= 60 else f"{s:.0f}s"


def run_pipeline(spec: PipelineSpec, *, command: str = "run", wait: bool = False, retry_failed: bool = False) -> dict:
    """Run the pipeline over every input video not already finished in ``output.dir``; return run.json's data.
    Raises ConfigError (on the driver, before anything starts) for a spec that :func:`check_spec` refuses, and
    OutputInUse while another run holds ``output.dir`` (``wait``: wait for it instead). A video that failed is done
    again while its failure was transient and tried fewer than ``decode.max_attempts`` times (any failure, with
    ``retry_failed``)."""
    started = time.time()
    skipped: Counter = Counter()  # files of the inputs' directories that are not videos, by suffix
    videos = check_spec(spec, command=command, skipped=skipped)
    spec = resolved(spec)  # device and dtype: auto decided once, here: every worker computes what the hash says
    out = check_output_dir(spec.output.dir)
    digest = config_hash(spec)
    with output_lock(out, wait=wait):  # one writer per output directory
        save_config(out, spec, digest)
        prints = {uri: fingerprint(uri) for uri in videos}
        writer = OutputWriter(out, config_hash=digest, model=spec.model_id(), shard_rows=spec.output.shard_rows,
                              fingerprints=prints)
        settled = writer.settled(max_attempts=spec.decode.max_attempts, retry_failed=retry_failed)
        todo = [uri for uri in videos if (video_id(uri), prints[uri]) not in settled]
        try:
            _stream(spec, todo, writer)
        except Unschedulable:
            writer.flush()  # the videos that did finish
            raise
        actions = None
        if spec.segments.localize and spec.tags.vocabulary:  # from the stored windows: no decoding, no model
            windows = read_table(out, "segments", digest).select(["video_id", "uri", "start_s", "end_s", "tags"])
            actions = write_actions(out, localize_videos(windows.to_pylist(), threshold=spec.tags.threshold),
                                    config_hash=digest)
        summary = _summary(writer, videos=videos, todo=todo, skipped=skipped, started=started)
        if actions is not None:
            summary["actions"] = actions
            summary["outputs"]["actions"] = str(out / "actions")
        write_text_atomic(out / "run.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _stream(spec: PipelineSpec, todo: list[str], writer: OutputWriter) -> None:
    """Decode and encode ``todo`` on Ray, committing whole videos through ``writer`` as their rows stream in."""
    progress = Progress(total=len(todo))
    if todo:
        with ray_session(spec.ray) as ray:
            total = ray.cluster_resources()
            spec = dataclasses.replace(spec, ray=fit_plan(spec.ray, total.get("CPU", 0.0), total.get("GPU", 0.0)))
            ds = ray.data.from_items([{"uri": uri} for uri in todo], override_num_blocks=len(todo))
            # decode: 1 video -> N segment rows (frames [T,H,W,3]) + 1 end row, on CPU tasks
            # A task or actor whose worker process dies is re-run by Ray (tasks 3 times, actors without limit): the
            # decoder child process already turns a video's own crash or hang into an errors row.
            decode, encode = DecodeStage(spec), EncodeStage(spec)
            ds = ds.flat_map(decode, num_cpus=decode.resources.cpus)
            # encode: N segment rows -> N rows with embeddings and tags, on actors that load the model once
            ds = ds.map_batches(_RayEncode, fn_constructor_kwargs={"stage": encode}, batch_size=encode.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=spec.ray.encoder_actors),
                                num_cpus=encode.resources.cpus, num_gpus=encode.resources.gpus or None,
                                batch_format="numpy")
            # write: on the driver, whole videos per shard, as rows stream in
            done = 0
            with Watchdog(ray, spec.ray) as watchdog:
                for table in _blocks(ray, ds):
                    watchdog.rows_arrived()
                    done += len(writer.add(table))
                    if done < len(todo):
                        progress.update(done, writer.segments)
        writer.flush()
    progress.update(len(todo) - len(writer.unfinished()), writer.segments, final=True)


def _blocks(ray: ModuleType, ds) -> Iterator[pa.Table]:
    """The dataset's blocks as Arrow tables, each fetched on this (the driver's main) thread. Not
    ``ds.iter_batches``: it fetches in threads of its own, and when the watchdog stopped a job whose node was lost,
    such a thread was still waiting in Ray for objects that could not be rebuilt; ``ray.shutdown()`` then woke it
    and Ray ended the process (exit 1, the watchdog's message never printed). Here the only thread left is the
    executor's, which is stopped before this returns."""
    from ray.data.block import BlockAccessor

    bundles = ds.iter_internal_ref_bundles()
    try:
        for bundle in bundles:
            for ref in bundle.block_refs:
                yield BlockAccessor.for_block(ray.get(ref)).to_arrow()
    finally:
        del bundles  # its executor shuts down on release (joining its scheduling thread): before ray.shutdown()


def _summary(writer: OutputWriter, *, videos: list[str], todo: list[str], skipped: Counter,
             started: float) -> dict:
    """run.json's figures."""
    wall, out = time.time() - started, writer.out_dir
    return {
        "videos_total": len(videos), "videos_skipped": len(videos) - len(todo),
        "files_not_videos": dict(sorted(skipped.items())), "videos_ok": writer.videos_ok,
        "videos_failed": writer.videos_failed, "errors_by_type": dict(writer.errors_by_type),
        "segments": writer.segments, "wall_s": round(wall, 3),
        "segments_per_s": round(writer.segments / wall, 3) if wall > 0 else 0.0,
        "config_hash": writer.config_hash, "model": writer.model, "videos_by_node": dict(writer.videos_by_node),
        "segments_by_encoder_node": dict(writer.segments_by_encoder_node),
        "outputs": {"segments": str(out / "segments"), "errors": str(out / "errors")},
    }


def save_config(out: Path, spec: PipelineSpec, config_hash: str) -> Path:
    """``output.dir/configs/<hash>.json``: the sections of the config that wrote these rows (a YAML document that
    :func:`pipeline.config.parse_spec` reads back), so search embeds queries with the same model and dtype."""
    sections = {f.name: dataclasses.asdict(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                if dataclasses.is_dataclass(getattr(spec, f.name))}
    (out / "configs").mkdir(exist_ok=True)
    return write_text_atomic(out / "configs" / f"{config_hash}.json", json.dumps(sections, indent=2) + "\n")


def format_summary(s: dict) -> str:
    """run.json's figures as the three lines ``reeltag run`` prints."""
    failed = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_type"].items()))
    lines = [
        f"reeltag run: {s['videos_total']} videos: {s['videos_ok']} ok, {s['videos_failed']} failed"
        + (f" ({failed})" if failed else "") + (f", {s['videos_skipped']} already done" if s["videos_skipped"] else ""),
        f"  {s['segments']} segments in {s['wall_s']:.1f} s ({s['segments_per_s']:.2f} segments/s), "
        f"model {s['model']}, config {s['config_hash']}",
        f"  outputs: {s['outputs']['segments']}/*.parquet, {s['outputs']['errors']}/*.parquet, "
        f"{s['outputs']['segments'].rsplit('/', 1)[0]}/run.json",
    ]
    return "\n".join(lines)
