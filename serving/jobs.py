"""Running work on the GPU worker from a request: readiness, the queue's 429, waiting without blocking the event
loop, cancelling when the client goes away, and out-of-memory as a 503 the server survives."""

import asyncio
from collections.abc import Callable
from typing import Any

import torch
from fastapi import HTTPException, Request
from loguru import logger

from serving.http_errors import RETRY_AFTER_S
from serving.worker import Job, QueueFull


def check_ready(request: Request) -> None:
    if not request.app.state.ready:
        raise HTTPException(503, "server is starting or shutting down", {"Retry-After": RETRY_AFTER_S})


async def run_job(fn: Callable, request: Request) -> Any:
    """`fn(cancel_event)` on the worker; its result, or its exception raised here."""
    check_ready(request)
    try:
        job = request.app.state.worker.submit(fn)
    except QueueFull:
        raise HTTPException(429, "queue is full; retry later", {"Retry-After": RETRY_AFTER_S}) from None
    try:
        return await wait_for(job, request)
    except torch.cuda.OutOfMemoryError:
        logger.error("out of GPU memory; the request failed, the server goes on")
        torch.cuda.empty_cache()
        raise HTTPException(503, "out of GPU memory; try a smaller size or fewer images") from None


async def wait_for(job: Job, request: Request) -> Any:
    """The job's result; a client that goes away cancels it (dropped if queued, stopped between steps if running)."""
    wrapped = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=0.2)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            job.cancel.set()
            logger.info("client disconnected: its job is cancelled")
            return await wrapped
