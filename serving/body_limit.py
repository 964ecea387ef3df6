"""ASGI middleware that bounds request bodies: over a size limit (declared or streamed) 413 before they are read,
and a body that does not arrive within a time limit 408, so a client that trickles cannot hold a connection."""

import asyncio
import time

from serving.http_errors import error

MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image in base64 plus the other fields
BODY_SECONDS = 60.0  # for the whole body: 32 MB at ~4 Mbit/s


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodyLimit:
    def __init__(self, app, limit: int = MAX_BODY_BYTES, seconds: float = BODY_SECONDS):
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refusal(BodyTooLarge())(scope, receive, send)
        seen, deadline, started, complete = 0, time.monotonic() + self.seconds, False, False

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # the body is in: later messages (a disconnect) come when they come
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise BodyTooSlow from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTooSlow) as e:
            if started:
                raise
            return await self._refusal(e)(scope, receive, send)

    def _refusal(self, e: Exception):
        """413 or 408, closing the connection: the rest of the body is never read."""
        if isinstance(e, BodyTooLarge):
            return error(413, f"request body over {self.limit} bytes", headers={"Connection": "close"})
        return error(408, f"request body not received within {self.seconds:.0f} s", headers={"Connection": "close"})
