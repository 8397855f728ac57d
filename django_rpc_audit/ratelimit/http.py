"""HTTP 429 for a call refused by its rate limit, with ``Retry-After``."""

from __future__ import annotations

import math

from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

from django_rpc_audit.exceptions import RPCRateLimitedError


def retry_after_header(exc: RPCRateLimitedError) -> str:
    """``Retry-After``'s value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(exc.retry_after)))


def rate_limited_response(exc: RPCRateLimitedError) -> HttpResponse:
    """A plain ``429 Too Many Requests`` response with ``Retry-After``, for a view to return::

    try:
        get_rpc_client().call("reports.generate", params)
    except RPCRateLimitedError as exc:
        return rate_limited_response(exc)
    """
    seconds = retry_after_header(exc)
    response = HttpResponse(
        f"Too many requests: try again in {seconds} s.\n",
        status=429,
        content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = seconds
    return response


class RPCRateLimitMiddleware(MiddlewareMixin):
    """Answer 429 with ``Retry-After`` whenever a view lets an ``RPCRateLimitedError`` escape.

    Sync and async. Views that want another response catch the error themselves; other
    exceptions go on to Django's handling. Put it anywhere in ``MIDDLEWARE``.
    """

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, RPCRateLimitedError):
            return rate_limited_response(exception)
        return None
