"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json

from starlette.responses import Response


class GatewayError(Exception):
    """A refusal the client is told about. `reason` labels the rejection metric and the audit entry."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
        code: str | None = None,
        param: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.reason = reason or code or type
        self.headers = headers or {}

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return Response(
            json.dumps(body),
            status_code=self.status,
            media_type="application/json",
            headers={**self.headers, "Cache-Control": "no-store"},
        )
