"""GET /health: 200 once the model is loaded and warmed up, 503 while starting or draining; open without a key."""

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
