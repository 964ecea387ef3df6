"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for request headers.

uvicorn bounds idle kept-alive connections (`timeout_keep_alive`) but nothing else: a connection that sends nothing,
or its headers a byte at a time, is held forever, and a few dozen of them fill `--max-connections`, after which
every request is answered 503. Here a connection waiting for the headers of a request, its first or a kept-alive
one, is closed when they are not all in within `HEADER_SECONDS`. Bodies have their own limit (`body_limit`).
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0  # slow mobile links send a few hundred bytes of headers in well under a second


class HeaderDeadlineProtocol(H11Protocol):
    header_seconds = HEADER_SECONDS
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:  # the first bytes of a kept-alive connection's next request
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
