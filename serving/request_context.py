"""ASGI middleware around every request: a request id (the client's `X-Request-Id`, else a new one) on the request
and its response, and an unexpected error turned into one logged traceback and a 500 that closes the connection."""

import uuid

from loguru import logger
from starlette.datastructures import MutableHeaders

from serving.http_errors import error
from serving.logs import REQUEST_ID


def request_id(scope) -> str:
    given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
    given = "".join(c for c in given if c.isprintable())[:200]
    return given or uuid.uuid4().hex


class RequestContext:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        REQUEST_ID.set(rid)  # every log line of this request's work carries it (serving.logs)
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-Id"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - the one place an unexpected error is logged and answered
            logger.opt(exception=e).error(f"request {rid}: {scope['method']} {scope['path']} failed")
            if not started:  # else the response is cut short, and the client sees the connection end
                headers = {"Connection": "close", "X-Request-Id": rid}
                await error(500, f"internal error (request id {rid})", "internal_error", headers)(scope, receive, send)
