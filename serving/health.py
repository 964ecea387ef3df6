"""GET /health: 200 once the model is loaded and warmed up, 503 while starting or draining; /health/live and
/health/ready for orchestrators' probes. Open without a key."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    worker = state.worker
    body = {
        "status": "ok" if state.ready else "unavailable",
        "queued": worker.jobs.qsize(),
        "running": worker.running,
        "completed": worker.completed,
        "cancelled": worker.cancelled,
    }
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/health/live")
async def live() -> JSONResponse:
    """The process is up and answering (for a liveness probe)."""
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready for work: loaded and warmed up, the worker thread alive, and no fatal CUDA error since (after one it
    stays 503, so that an orchestrator restarts the process)."""
    state = request.app.state
    worker = state.worker
    problems = []
    if not state.ready:
        problems.append("starting or shutting down")
    if not worker.thread.is_alive():
        problems.append("the worker thread is not running")
    if worker.fatal:
        problems.append(f"fatal CUDA error: {worker.fatal}")
    body = {"status": "ready" if not problems else "unavailable", "problems": problems}
    return JSONResponse(body, status_code=503 if problems else 200)
