"""The optional API key: `Authorization: Bearer KEY` on the routes that depend on `require_api_key`."""

import secrets

from fastapi import HTTPException, Request


async def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise HTTPException(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})
