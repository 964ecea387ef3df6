"""One worker thread running jobs in order from a bounded queue: never two GPU jobs at once.

A job whose `run` has a `batch_key` (a generation without an input image) takes along the jobs waiting behind it
with the same key (same size, steps and LoRA set), up to `max_batch` images, and runs them as one batch through
`run.run_batch`; a job without a key (a LoRA change) is a barrier that no job is taken past. Each job of a batch
keeps its own future, cancel event and outcome."""

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
    def __init__(self, max_queue_size: int, max_batch: int = 1):
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {max_queue_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch  # images in one batch at most
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue_size)
        self.thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
        self.running = 0
        self.current: list[Job] = []  # the jobs running now (one batch)
        self.batches = 0  # batches of more than one job run
        self.completed = 0
        self.cancelled = 0
        self.fatal: str | None = None  # a CUDA error the device may not recover from: /health/ready turns 503
        self.observe_wait: Callable[[float], None] | None = None  # seconds a job waited (metrics)
        self.observe_error: Callable[[BaseException], None] | None = None
        self.observe_batch: Callable[[int], None] | None = None  # jobs in a batch of more than one

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
        """Ask the running jobs to stop between steps; whether there were any."""
        jobs = list(self.current)
        for job in jobs:
            job.cancel.set()
        return bool(jobs)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, fail the queued ones, end the thread."""
        self.drop_queued("server shutting down")
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not self._start(job):
                continue
            batch = [job, *self._partners(job)]
            self.running, self.current = len(batch), batch
            try:
                if len(batch) == 1:
                    self._run_one(job)
                else:
                    self._run_batch(batch)
            finally:
                self.running, self.current = 0, []

    def _start(self, job: Job) -> bool:
        """Whether `job` is to run (not cancelled while it waited); counts its wait."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.cancel.is_set():  # its client left while it waited
            self.cancelled += 1
            job.future.set_exception(Cancelled("cancelled before it started"))
            return False
        if self.observe_wait is not None:
            self.observe_wait(time.monotonic() - job.submitted)
        return True

    def _partners(self, first: Job) -> list[Job]:
        """The waiting jobs that run in one batch with `first`, taken out of the queue in their order."""
        key = getattr(first.run, "batch_key", None)
        rows = getattr(first.run, "rows", 1)
        if key is None or self.max_batch < 2 or rows >= self.max_batch:
            return []
        taken = []
        with self.jobs.mutex:  # the queue's own lock: submitters wait the few microseconds this takes
            for job in list(self.jobs.queue):
                if job is None or getattr(job.run, "batch_key", None) is None:
                    break  # a barrier (a LoRA change, the stop marker): nothing behind it runs before it
                if job.run.batch_key != key or job.cancel.is_set() or rows + job.run.rows > self.max_batch:
                    continue
                self.jobs.queue.remove(job)
                taken.append(job)
                rows += job.run.rows
                if rows >= self.max_batch:
                    break
            if taken:
                self.jobs.not_full.notify(len(taken))
        return [job for job in taken if self._start(job)]

    def _run_one(self, job: Job) -> None:
        try:
            job.future.set_result(job.context.run(job.run, job.cancel))
            self.completed += 1
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            self._fail(job, e)

    def _run_batch(self, batch: list[Job]) -> None:
        def settle(i: int, outcome) -> None:
            job = batch[i]
            if job.future.done():
                return
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
            else:
                job.future.set_result(outcome)
                self.completed += 1

        self.batches += 1
        if self.observe_batch is not None:
            self.observe_batch(len(batch))
        try:
            outcomes = batch[0].context.run(
                batch[0].run.run_batch, [job.run for job in batch], [job.cancel for job in batch], settle
            )
            for i, outcome in enumerate(outcomes):
                settle(i, outcome)
        except BaseException as e:  # noqa: BLE001 - every job not settled yet fails with it
            for i in range(len(batch)):
                settle(i, e)

    def _fail(self, job: Job, e: BaseException) -> None:
        if isinstance(e, Cancelled):
            self.cancelled += 1
        else:
            if is_fatal(e):
                self.fatal = f"{type(e).__name__}: {e}"[:500]
            if self.observe_error is not None:
                self.observe_error(e)
        job.future.set_exception(e)


def is_fatal(e: BaseException) -> bool:
    """A CUDA error other than running out of memory: the context may be unusable until the process restarts."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(e, getattr(torch, "AcceleratorError", ())) or (
        isinstance(e, RuntimeError) and "CUDA error" in str(e)
    )
