"""The JSON error shape `{"error": {"message", "type"}}` for every failure, and the handlers that map the
library's exceptions (by type) and HTTP errors to it. No stack trace reaches a client; unexpected errors are
`request_context`'s."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import Cancelled, InvalidInput, LoraError, LoraNotLoaded

RETRY_AFTER_S = "10"
KINDS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
}


def error(
    status: int, message: str, kind: str | None = None, headers: dict | None = None, param: str | None = None
) -> JSONResponse:
    """The error answer; `param` and `code` complete OpenAI's shape, which its clients read on every route."""
    body = {"error": {"message": message, "type": kind or KINDS.get(status, "error"), "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# every status a route may answer besides 200, for the OpenAPI schema
RESPONSES = {
    status: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for status, text in (
        (400, "unusable input (a LoRA file, a path)"),
        (401, "missing or wrong API key"),
        (403, "forbidden (a path outside the LoRA directory, LoRA loading off)"),
        (404, "not found (a LoRA file, a loaded LoRA)"),
        (408, "the request body did not arrive in time"),
        (413, "request body too large"),
        (422, "invalid request: the message names the field"),
        (429, "queue full: retry after Retry-After seconds"),
        (500, "unexpected error (logged with the request id; the connection is closed)"),
        (503, "starting, shutting down, cancelled, or out of GPU memory"),
    )
}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}

MAX_PROBLEMS = 10  # a body with a million bad keys gets a short answer, never its input echoed
MAX_MESSAGE = 2000


def validation_message(errors: list[dict]) -> str:
    """'field: problem; ...' for pydantic's errors, bounded in count and length (no input values echoed)."""
    problems = []
    for err in errors[:MAX_PROBLEMS]:
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{loc}: {err['msg']}"[:200])
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"... and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(problems)[:MAX_MESSAGE]


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # OpenAI's API answers invalid input with 400 naming the param
            loc = [str(p) for p in exc.errors()[0]["loc"] if p != "body"] if exc.errors() else []
            return error(400, validation_message(exc.errors()), "invalid_request_error", param=".".join(loc) or None)
        return error(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(InvalidInput)
    async def _input(request: Request, exc: InvalidInput) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(LoraError)
    async def _lora(request: Request, exc: LoraError) -> JSONResponse:
        lora_dir = request.app.state.lora_dir
        message = f"not a usable LoRA: {exc}"
        return error(400, message.replace(str(lora_dir), "<lora-dir>") if lora_dir else message)

    @app.exception_handler(LoraNotLoaded)
    async def _not_loaded(request: Request, exc: LoraNotLoaded) -> JSONResponse:
        return error(404, "that LoRA is not loaded")

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        return error(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})
