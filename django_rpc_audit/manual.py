"""Manual logging: ``RPCLogger`` and ``RPCLogContext``, for calls made outside ``RPCClient``."""

from __future__ import annotations

import logging
import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.db import router
from django.utils import timezone

from django_rpc_audit.conf import get_config
from django_rpc_audit.context import get_caller_context, resolve_user
from django_rpc_audit.exceptions import RPCError, RPCTimeoutError
from django_rpc_audit.payload import stored, stored_text
from django_rpc_audit.redaction import Redactor, get_redactor
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import canonical_correlation_id
from django_rpc_audit.writers import sink

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog

logger = logging.getLogger(__name__)


class RPCLogger:
    """Write ``RPCLog`` rows by hand. Every method logs and swallows its own failures.

    ::

        log = RPCLogger.create_log(correlation_id, "legacy.sync", {"batch": 7}, user=request.user)
        try:
            result = legacy_client.sync(batch=7)
        except TimeoutError:
            RPCLogger.mark_timeout(log, duration_ms=30_000)
            raise
        RPCLogger.mark_success(log, result, duration_ms=12.5)

    ``create_log`` returns ``None`` when logging is disabled or the write failed; the
    ``mark_*`` methods accept that ``None`` and do nothing.
    """

    @staticmethod
    def create_log(
        correlation_id: str,
        method: str,
        params: Any,
        user: Any = None,
        caller_ip: str | None = None,
        user_agent: str | None = None,
    ) -> RPCLog | None:
        """Insert a ``pending`` row and return it."""
        from django_rpc_audit.models import RPCLog

        config = get_config()
        if not config.enable_logging:
            return None
        try:
            redactor = _redactor()
            rule = redactor.rule_for(method).params
            return sink.record_started(
                RPCLog.objects.using(router.db_for_write(RPCLog)),
                # UUIDs as the client writes them, so the admin's exact search finds them.
                correlation_id=canonical_correlation_id(str(correlation_id)) or str(correlation_id),
                method=method,
                params=stored(params, config.max_params_bytes, redactor, rule).value,
                user=user,
                caller_ip=caller_ip,
                user_agent=user_agent,
                started_at=timezone.now(),
            )
        except Exception:
            logger.exception("Could not create the RPC log row of %s (%s).", method, correlation_id)
            return None

    @staticmethod
    def mark_success(log: RPCLog | None, response_data: Any, duration_ms: float) -> None:
        """Record a successful reply."""
        _complete(log, status=RPCStatus.SUCCESS, response=response_data, duration_ms=duration_ms)

    @staticmethod
    def mark_failed(
        log: RPCLog | None, error_code: str, error_message: str, duration_ms: float
    ) -> None:
        """Record a failed call."""
        _complete(
            log,
            status=RPCStatus.FAILED,
            error_code=error_code,
            error_message=error_message,
            duration_ms=duration_ms,
        )

    @staticmethod
    def mark_timeout(log: RPCLog | None, duration_ms: float) -> None:
        """Record a call that got no reply in time."""
        _complete(
            log,
            status=RPCStatus.TIMEOUT,
            error_code="timeout",
            error_message="No reply within the timeout.",
            duration_ms=duration_ms,
        )


def _complete(
    log: RPCLog | None,
    *,
    status: str,
    duration_ms: float,
    response: Any = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    from django_rpc_audit.models import RPCLog

    if log is None:
        return
    config = get_config()
    redactor = _redactor()
    if response is not None:
        rule = redactor.rule_for(log.method).response
        response = stored(response, config.max_response_bytes, redactor, rule).value
    values = sink.outcome_values(
        status=status,
        response=response,
        error_code=error_code,
        error_message=stored_text(error_message, config.max_error_message_bytes, redactor),
        duration_ms=duration_ms,
        completed_at=timezone.now(),
    )
    if config.costs:
        row = {"method": log.method, "params": log.params, "user_id": log.user_id}
        values["cost"] = sink.stored_cost({}, {**row, "username": log.username, **values})
    try:
        RPCLog.objects.using(router.db_for_write(RPCLog)).filter(pk=log.pk).update(**values)
    except Exception:
        logger.exception("Could not complete the RPC log row %s as %s.", log.pk, status)
        return
    for name, value in values.items():
        setattr(log, name, value)


def _redactor() -> Redactor:
    config = get_config()
    return get_redactor(config.redact_keys, config.redact_methods)


class RPCLogContext:
    """Log one call made in a ``with`` block; the outcome follows from how the block ends.

    ::

        with RPCLogContext(correlation_id, "legacy.sync", {"batch": 7}) as log_ctx:
            log_ctx.set_response(legacy_client.sync(batch=7))

    Leaving normally records ``success`` with the response given to :meth:`set_response`; an
    :class:`~django_rpc_audit.exceptions.RPCTimeoutError` or ``TimeoutError`` records
    ``timeout``; any other exception records ``failed`` (its ``code`` for an ``RPCError``, else
    its class name) and propagates. User, IP and user agent default to the caller context.
    Also usable as ``async with``.
    """

    def __init__(
        self,
        correlation_id: str | uuid.UUID,
        method: str,
        params: Any,
        user: Any = None,
        caller_ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.correlation_id = str(correlation_id)
        self.method = method
        self.params = params
        self.user = user
        self.caller_ip = caller_ip
        self.user_agent = user_agent
        self.response: Any = None
        self.log: RPCLog | None = None
        self._started = 0.0

    def set_response(self, response_data: Any) -> None:
        """The reply to record if the block ends without an exception."""
        self.response = response_data

    def __enter__(self) -> RPCLogContext:
        context = get_caller_context()
        self.log = RPCLogger.create_log(
            self.correlation_id,
            self.method,
            self.params,
            user=self.user if self.user is not None else resolve_user(context),
            caller_ip=self.caller_ip if self.caller_ip is not None else context.caller_ip,
            user_agent=self.user_agent if self.user_agent is not None else context.user_agent,
        )
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        duration_ms = (time.perf_counter() - self._started) * 1000
        if exc is None:
            RPCLogger.mark_success(self.log, self.response, duration_ms)
        elif isinstance(exc, RPCTimeoutError | TimeoutError):
            RPCLogger.mark_timeout(self.log, duration_ms)
        else:
            code = exc.code if isinstance(exc, RPCError) else type(exc).__name__
            RPCLogger.mark_failed(self.log, code, str(exc), duration_ms)

    async def __aenter__(self) -> RPCLogContext:
        return await sync_to_async(self.__enter__)()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await sync_to_async(self.__exit__)(exc_type, exc, traceback)
