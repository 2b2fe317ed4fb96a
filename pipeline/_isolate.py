"""Decoding in a child process, so the job survives what native decoders do: a hang (Decord can stall holding
the GIL) is killed after ``timeout_s`` without progress, a crash loses only that video's attempt, and the child
is replaced every ``recycle_after`` videos so leaks cannot grow."""

from __future__ import annotations

import multiprocessing as mp
import resource
from multiprocessing.connection import Connection
from typing import Callable, Iterator


def _serve(conn: Connection, fn: Callable, memory_mb: int | None = None) -> None:
    """Child: for each request, stream ``fn(*args)``'s rows back, then a ``done`` marker. ``memory_mb`` caps the
    child's address space: an allocation past it fails (a MemoryError the row generator records) instead of
    taking the node's memory."""
    if memory_mb is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = memory_mb << 20 if hard == resource.RLIM_INFINITY else min(memory_mb << 20, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        if args is None:
            return
        for row in fn(*args):
            conn.send(("row", row))
        conn.send(("done", None))


class IsolatedDecoder:
    """Runs a row generator ``fn(*args)`` in a reusable child process; failures come back as ``on_fail`` rows."""

    def __init__(self, fn: Callable[..., Iterator[dict]], *, timeout_s: float, recycle_after: int,
                 timeout_setting: str = "", memory_mb: int | None = None):
        """``timeout_setting``: where the limit is set (named in the timeout message), e.g. a config key;
        ``memory_mb``: the child's address-space limit (None: none)."""
        self.fn, self.timeout_s, self.recycle_after, self.memory_mb = fn, timeout_s, recycle_after, memory_mb
        self._timeout_text = f"no progress for {timeout_s:g} s" + (f" ({timeout_setting})" if timeout_setting else "")
        self._proc = self._conn = None
        self._served = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # fork is unsafe inside threaded workers such as Ray's
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.fn, self.memory_mb), daemon=True)
        self._proc.start()
        child.close()
        self._served = 0

    def run(self, *args, on_fail: Callable[[str, str, int], dict]) -> Iterator[dict]:
        """Yield the child's rows for ``args``; if it stalls or dies, yield ``on_fail(type, message, rows_so_far)``."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send(args)
        finished = False
        try:
            yield from self._rows(on_fail)
            finished = True
        finally:
            if not finished and self._proc is not None:
                self.close(kill=True)  # the consumer stopped early: the child may still be sending this video

    def _rows(self, on_fail) -> Iterator[dict]:
        count = 0
        while True:
            if not self._conn.poll(self.timeout_s):
                self.close(kill=True)
                yield on_fail("timeout", f"{self._timeout_text}: decoder stopped", count)
                return
            try:
                kind, row = self._conn.recv()
            except (EOFError, ConnectionError, OSError):
                self._proc.join(timeout=5)  # reap it, so its exit code (the signal) is known
                code = self._proc.exitcode
                self.close(kill=True)
                yield on_fail("decoder_crashed", f"the decoder process died (exit code {code})", count)
                return
            if kind == "done":
                break
            count += row.get("kind") == "segment"
            yield row
        self._served += 1
        if self._served >= self.recycle_after:
            self.close()

    def close(self, *, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None

    def __del__(self):
        try:
            self.close(kill=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
