"""HTTP helpers shared by the API's route modules: JSON answers, JSON errors, bodies, the token.

Every error the API returns is JSON {"error": ..., "detail": ...}; handlers raise `ApiError`
and the app's error middleware turns it into that answer.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from meshd.api.agent import AGENT

__all__ = ["ApiError", "error_response", "json_response", "read_json", "require_token"]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: Any = None) -> web.Response:
    return json_response({"error": error, "detail": detail}, status)


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise ApiError(400, "bad_request", "expected a JSON object body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "bad_json", str(e)) from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "expected a JSON object body")
    return body


def require_token(request: web.Request, why: str = "this call") -> None:
    """ApiError 401/403 unless the request carries the node's API token."""
    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiError(401, "unauthorized", f"{why} needs Authorization: Bearer <token>")
    scheme, _, token = header.partition(" ")
    expected = request.app[AGENT].api_token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(403, "forbidden", "wrong API token")
