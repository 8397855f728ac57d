"""The exceptions an RPC call raises; all derive from :class:`RPCError`."""

from __future__ import annotations


class RPCError(Exception):
    """Base class of every error this package raises for an RPC call.

    ``code`` is a short machine-readable reason, stored as the log row's ``error_code``.
    """

    code: str = "rpc_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RPCDisabledError(RPCError):
    """RPC is switched off (``DJANGO_CFG_RPC["ENABLED"]`` is false)."""

    code = "disabled"


class RPCConnectionError(RPCError):
    """The transport could not reach Redis. The message never contains the URL's password."""

    code = "connection_error"


class RPCTimeoutError(RPCError):
    """No reply arrived within the timeout.

    ``timeout`` is the configured limit in seconds.
    """

    code = "timeout"

    def __init__(self, message: str, *, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


class RPCRemoteError(RPCError):
    """The server answered with ``success: false``.

    ``code`` and ``message`` are the server's own ``error_code`` and ``error``, unchanged.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class RPCProtocolError(RPCError):
    """A reply arrived but is not what the wire protocol promises (not JSON, wrong shape)."""

    code = "protocol_error"


class RPCRateLimitedError(RPCError):
    """The call was over its rate limit (``RATE_LIMITS``) and was **not sent**.

    ``retry_after`` is the number of seconds after which a retry can succeed (exact for the
    subject's own budget, unless others drew on it meanwhile). Map it to HTTP 429 with
    :func:`~django_rpc_audit.ratelimit.http.rate_limited_response` or
    :class:`~django_rpc_audit.ratelimit.http.RPCRateLimitMiddleware`. ``code`` is
    ``"rate_limited"``, or ``"rate_limiter_unavailable"`` when the limiter failed and
    ``RATE_LIMIT_FAIL_OPEN`` is off.
    """

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
