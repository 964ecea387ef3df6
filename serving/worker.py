"""One worker thread running jobs in order from a bounded queue: never two GPU jobs at once."""

import contextvars
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from errors import Cancelled


class QueueFull(Exception):
    """The queue holds `max_queue_size` jobs already."""


@dataclass
class Job:
    run: Callable[[threading.Event], Any]
    future: Future
    cancel: threading.Event
    # the submitter's context (its request id for the log lines, serving.logs), in which the job runs
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    submitted: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, max_queue_size: int):
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {max_queue_size}")
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue_size)
        self.thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
        self.running = 0
        self.current: Job | None = None  # the job running now
        self.completed = 0
        self.cancelled = 0
        self.fatal: str | None = None  # a CUDA error the device may not recover from: /health/ready turns 503
        self.observe_wait: Callable[[float], None] | None = None  # seconds a job waited (metrics)
        self.observe_error: Callable[[BaseException], None] | None = None

    def start(self) -> None:
        self.thread.start()

    def submit(self, run: Callable[[threading.Event], Any]) -> Job:
        job = Job(run, Future(), threading.Event())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def drop_queued(self, reason: str) -> int:
        """Fail every job still waiting (the running one goes on); returns how many."""
        dropped = 0
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return dropped
            if job is None:
                self.jobs.put_nowait(None)
                return dropped
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Cancelled(reason))
            dropped += 1

    def cancel_running(self) -> bool:
        """Ask the running job to stop between steps; whether there was one."""
        job = self.current
        if job is not None:
            job.cancel.set()
        return job is not None

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, fail the queued ones, end the thread."""
        self.drop_queued("server shutting down")
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.cancel.is_set():  # its client left while it waited
                self.cancelled += 1
                job.future.set_exception(Cancelled("cancelled before it started"))
                continue
            self.running, self.current = 1, job
            if self.observe_wait is not None:
                self.observe_wait(time.monotonic() - job.submitted)
            try:
                job.future.set_result(job.context.run(job.run, job.cancel))
                self.completed += 1
            except Cancelled as e:
                self.cancelled += 1
                job.future.set_exception(e)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                if is_fatal(e):
                    self.fatal = f"{type(e).__name__}: {e}"[:500]
                if self.observe_error is not None:
                    self.observe_error(e)
                job.future.set_exception(e)
            finally:
                self.running, self.current = 0, None


def is_fatal(e: BaseException) -> bool:
    """A CUDA error other than running out of memory: the context may be unusable until the process restarts."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(e, getattr(torch, "AcceleratorError", ())) or (
        isinstance(e, RuntimeError) and "CUDA error" in str(e)
    )
