"""ASGI middleware that refuses request bodies over a size limit, declared or streamed, before they are read."""

from fastapi import HTTPException

from serving.http_errors import error

MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image in base64 plus the other fields


class BodyLimit:
    """413 for request bodies over `limit` bytes."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)
