"""The optional API key, checked before a request's body is read: `Authorization: Bearer KEY` (the scheme in any
case) on every route but /health (and the docs, with `--public-docs`)."""

import secrets

from serving.http_errors import error

OPEN = ("/health",)
DOCS = ("/docs", "/redoc", "/openapi.json")
UI = ("/ui",)  # behind its own login page (serving/ui.py)


def authorised(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


class ApiKeyGuard:
    """ASGI middleware: 401 before anything of the request is read when the key is missing or wrong."""

    def __init__(self, app, key: str | None, public_docs: bool = False, ui: bool = False, public_metrics: bool = False):
        self.app, self.key = app, key
        self.open = (
            OPEN + (DOCS if public_docs else ()) + (UI if ui else ()) + (("/metrics",) if public_metrics else ())
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope["path"].startswith(self.open):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        if not authorised(header, self.key):
            # and the connection closes: a body sent anyway is not read
            headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
            response = error(401, "missing or wrong API key", headers=headers)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
