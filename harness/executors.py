"""Executors run a stage of independent jobs: in-process (local) or as Ray tasks.

Both call the same job function with the same arguments, so a job gives the same files
whichever executor ran it. The job function does not raise for a failing job: it writes
``error.json`` and returns a failed outcome. Executors handle only what can fail around
it, such as a Ray worker that dies.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

RAY_ADDRESS_ENV = "BRAT_HARNESS_RAY_ADDRESS"


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[..., R], jobs: Sequence[J], *args: Any, on_error: Callable[[J, BaseException, str], R]) -> list[R]:
        """Return ``[fn(job, *args) for job in jobs]``, possibly in parallel.

        ``on_error(job, error, traceback_text)`` turns an error raised outside ``fn``
        (for example a lost Ray worker) into a result, so one job cannot stop the stage.
        """
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs jobs one after the other in this process."""

    name = "local"

    def map(self, fn: Callable[..., R], jobs: Sequence[J], *args: Any, on_error: Callable[[J, BaseException, str], R]) -> list[R]:
        results = []
        for job in jobs:
            try:
                results.append(fn(job, *args))
            except Exception as error:  # noqa: BLE001 - a job function bug must not stop the other jobs
                logger.error("job %s failed outside its job function: %s", job, error)
                results.append(on_error(job, error, traceback.format_exc()))
        return results

    def close(self) -> None:
        return None


class RayExecutor:
    """Runs each job as a Ray task (``pip install 'brat-harness[ray]'``).

    Args:
        address: Ray cluster address; ``None`` reads ``BRAT_HARNESS_RAY_ADDRESS`` and
            otherwise starts a local Ray instance.
        num_cpus: CPUs reserved per job.
        num_gpus: GPUs reserved per job.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0) -> None:
        try:
            import ray
        except ImportError as error:
            raise RuntimeError(
                "the ray executor needs the optional dependency 'ray'; install it with "
                "pip install 'brat-harness[ray]', or run with --executor local"
            ) from error
        self._ray = ray
        self._started = False
        address = address or os.environ.get(RAY_ADDRESS_ENV)
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
            self._started = True
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus}

    def map(self, fn: Callable[..., R], jobs: Sequence[J], *args: Any, on_error: Callable[[J, BaseException, str], R]) -> list[R]:
        if not jobs:
            return []
        remote = self._ray.remote(**self.options)(fn)
        futures = [remote.remote(job, *args) for job in jobs]
        results = []
        for job, future in zip(jobs, futures, strict=True):
            try:
                results.append(self._ray.get(future))
            except Exception as error:  # noqa: BLE001 - a lost worker fails only its job
                logger.error("ray task for job %s failed: %s", job, error)
                results.append(on_error(job, error, traceback.format_exc()))
        return results

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


EXECUTORS: dict[str, Callable[[], Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str) -> Executor:
    """Build the executor named ``name`` (``local`` or ``ray``)."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of {sorted(EXECUTORS)}")
    return EXECUTORS[name]()
