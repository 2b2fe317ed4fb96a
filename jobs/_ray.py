"""Ray connection: an embedded local Ray by default, an existing cluster with ``ray.address`` or RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from pipeline.config import RaySpec


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
