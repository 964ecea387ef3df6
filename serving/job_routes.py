"""Jobs: `POST /jobs` (the `/generate` body) answers 202 with an id at once; `GET /jobs/{id}` gives its state,
place in the queue, step and timings, and the images when done; `GET /jobs/{id}/events` streams the same as
server-sent events, one per denoising step; `DELETE /jobs/{id}` cancels it. Jobs go through the server's one
worker queue with `/generate` (same 429 when full). Finished jobs are kept `KEEP_SECONDS` and at most `KEEP`
of them; a forgotten id is 410, an unknown one 404."""

import asyncio
import base64
import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from loguru import logger
from sse_starlette.sse import EventSourceResponse

from errors import Cancelled, FluxError
from serving.generate import encode_all, generation
from serving.http_errors import RESPONSES, RETRY_AFTER_S
from serving.jobs import check_ready
from serving.logs import REQUEST_ID
from serving.schemas import GenerateRequest, documented, parse
from serving.worker import Job, QueueFull

router = APIRouter(responses=RESPONSES)
KEEP = 256  # finished jobs kept
KEEP_SECONDS = 900.0  # and for how long
FORGOTTEN = 4096  # ids remembered after that, to answer 410 instead of 404
TERMINAL = ("done", "failed", "cancelled")


@dataclass
class JobRecord:
    id: str
    request: GenerateRequest
    job: Job | None = None
    state: str = "queued"
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict | None = None
    preview: str | None = None  # base64 JPEG of the latest preview
    preview_step: int = 0

    def view(self, position: int | None, with_result: bool = True) -> dict[str, Any]:
        out = {
            "id": self.id, "state": self.state, "position": position, "step": self.step, "total": self.total,
            "created": self.created, "started": self.started, "finished": self.finished, "error": self.error,
        }  # fmt: skip
        if with_result and self.result is not None:
            out["result"] = self.result
        if self.preview is not None:
            out["preview"], out["preview_step"] = self.preview, self.preview_step
        return out


class JobRegistry:
    def __init__(self):
        self.records: OrderedDict[str, JobRecord] = OrderedDict()
        self.forgotten: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, record: JobRecord) -> None:
        with self.lock:
            self._prune()
            self.records[record.id] = record

    def get(self, job_id: str) -> JobRecord:
        with self.lock:
            self._prune()
            if job_id in self.records:
                return self.records[job_id]
            if job_id in self.forgotten:
                raise HTTPException(410, "that job's result is no longer kept")
        raise HTTPException(404, "no such job")

    def _prune(self) -> None:
        now = time.time()
        finished = [r for r in self.records.values() if r.state in TERMINAL]
        expired = [r for r in finished if now - (r.finished or now) > KEEP_SECONDS]
        expired += finished[: max(len(finished) - KEEP, 0)]
        for record in expired:
            if self.records.pop(record.id, None) is not None:
                self.forgotten[record.id] = None
        while len(self.forgotten) > FORGOTTEN:
            self.forgotten.popitem(last=False)


def position(request: Request, record: JobRecord) -> int | None:
    """1 for the next job to run, 0 while running, None once finished."""
    if record.state == "running":
        return 0
    if record.state != "queued" or record.job is None:
        return None
    queued = list(request.app.state.worker.jobs.queue)
    return queued.index(record.job) + 1 if record.job in queued else None


MAX_PREVIEW_EVERY = 100


@router.post("/jobs", status_code=202, openapi_extra=documented(GenerateRequest))
async def create_job(request: Request, preview_every: int = 0) -> JSONResponse:
    """`preview_every=N`: a small preview (latents seen as colours, 1/8 of the size) every N steps, in the
    events and in GET /jobs/{id}; off by default."""
    if not 0 <= preview_every <= MAX_PREVIEW_EVERY:
        raise HTTPException(422, f"preview_every must be in [0, {MAX_PREVIEW_EVERY}]")
    body = await parse(request, GenerateRequest)
    check_ready(request)
    state = request.app.state
    record = JobRecord(uuid.uuid4().hex, body)
    pipeline = state.pipeline

    def preview(step: int, latents) -> None:
        if preview_every and step % preview_every == 0:
            buffer = io.BytesIO()
            pipeline.preview(latents, body.height, body.width).save(buffer, format="JPEG", quality=80)
            record.preview, record.preview_step = base64.b64encode(buffer.getvalue()).decode(), step

    run = generation(
        request.app, body, progress=lambda step, total: _progress(record, step, total),
        on_latents=preview if preview_every else None,
    )  # fmt: skip

    def job(cancel: threading.Event):
        REQUEST_ID.set(record.id)  # the job's log lines carry its id
        record.state, record.started = "running", time.time()
        images, seed = run(cancel)
        metadata = state.settings.metadata
        encoded = encode_all(images, body.output_format, body.jpeg_quality, metadata)
        return [base64.b64encode(b).decode() for b in encoded], [image.info["seed"] for image in images]

    try:
        record.job = state.worker.submit(job)
    except QueueFull:
        raise HTTPException(429, "queue is full; retry later", {"Retry-After": RETRY_AFTER_S}) from None
    record.job.future.add_done_callback(lambda future: _finish(record, future))
    state.jobs.add(record)
    logger.info(f"job {record.id} queued")
    urls = {"status_url": f"/jobs/{record.id}", "events_url": f"/jobs/{record.id}/events"}
    return JSONResponse({"id": record.id, "state": "queued", **urls}, 202, {"Location": urls["status_url"]})


def _progress(record: JobRecord, step: int, total: int) -> None:
    record.step, record.total = step, total


def _finish(record: JobRecord, future) -> None:
    record.finished = time.time()
    if future.cancelled():
        record.state = "cancelled"
        return
    error = future.exception()
    if error is None:
        images, seeds = future.result()
        record.result = {"images": images, "seeds": seeds, "format": record.request.output_format}
        record.state = "done"
    elif isinstance(error, Cancelled):
        record.state, record.error = "cancelled", str(error)
    else:
        message = str(error) if isinstance(error, FluxError) else f"{type(error).__name__} (see the server log)"
        record.state, record.error = "failed", message
        if not isinstance(error, FluxError):
            logger.opt(exception=error).error(f"job {record.id} failed")


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    record = request.app.state.jobs.get(job_id)
    return JSONResponse(record.view(position(request, record)))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel: a queued job is dropped, a running one stops between steps; a finished one stays as it is."""
    record = request.app.state.jobs.get(job_id)
    if record.state not in TERMINAL and record.job is not None:
        record.job.cancel.set()
        if record.job.future.cancel():  # still queued: it never runs
            record.state, record.finished = "cancelled", time.time()
        logger.info(f"job {record.id}: cancel asked")
    return JSONResponse(record.view(position(request, record), with_result=False))


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> EventSourceResponse:
    """Server-sent events: `state` when the state changes, `progress` after every step (`step`, `total`), then one
    last event named after the final state (`done` with the seeds; the images are at GET /jobs/{id})."""
    record = request.app.state.jobs.get(job_id)

    async def events():
        state, step = None, 0
        while True:
            view = record.view(position(request, record), with_result=False)
            for done in range(step + 1, view["step"] + 1):  # every step, even two that came between two looks
                yield {"event": "progress", "data": json.dumps(dict(view, step=done))}
            step = view["step"]
            if view["state"] in TERMINAL:
                if record.result is not None:
                    view["seeds"] = record.result["seeds"]
                yield {"event": view["state"], "data": json.dumps(view)}
                return
            if view["state"] != state:
                state = view["state"]
                yield {"event": "state", "data": json.dumps(view)}
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.05)

    return EventSourceResponse(events(), ping=15)
