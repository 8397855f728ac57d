"""The signals every RPC call sends: :data:`rpc_started` and :data:`rpc_finished`.

Connect to them like to Django's own signals; the sender is the client class
(:class:`~django_rpc_audit.client.RPCClient`). They are sent with ``send_robust`` /
``asend_robust``: a receiver that raises is logged and never breaks the call. ::

    from django.dispatch import receiver
    from django_rpc_audit.signals import rpc_finished

    @receiver(rpc_finished, dispatch_uid="myapp.alert_on_rpc_failure")
    def alert_on_rpc_failure(sender, *, status, method, error_message, **kwargs):
        if status != "success":
            notify_ops(f"{method} {status}: {error_message}")
"""

from __future__ import annotations

from django.dispatch import Signal

rpc_started = Signal()
"""Sent just before the request goes to the transport.

Keyword arguments:

``correlation_id`` (str)
    The call's id (a uuid4 string unless the caller gave one); also the reply key's suffix.
``method`` (str)
    The RPC method name.
``params`` (dict)
    The parameters, redacted: values of secret keys (``REDACT_KEYS``) are ``"***"`` and
    ``REDACT_METHODS`` rules applied. The wire payload itself is sent unchanged.
``user``
    The authenticated user the call is attributed to, or ``None``.
``caller_ip`` (str | None)
    The client IP of the request (django-ipware), or the one given explicitly.
``user_agent`` (str | None)
    The request's ``User-Agent``, or the one given explicitly.
``started_at`` (datetime)
    Aware UTC time the call started.
"""

rpc_finished = Signal()
"""Sent exactly once for every :data:`rpc_started`, whatever happened (reply, remote error,
timeout, Redis down, cancellation), after the transport returned or raised.

Keyword arguments: all of :data:`rpc_started`'s, plus:

``status`` (str)
    ``"success"``, ``"failed"`` or ``"timeout"`` (:class:`~django_rpc_audit.models.RPCStatus`).
``response`` (dict | None)
    The server's ``result`` on success (redacted like ``params``), else ``None``.
``error_code`` (str | None)
    The server's ``error_code`` for a remote error, or the client's own code
    (``"timeout"``, ``"connection_error"``, ``"protocol_error"``, ``"cancelled"``, ...); ``None``
    on success.
``error_message`` (str | None)
    The server's ``error`` text, or the client's description, with echoed secrets
    (``token=...``, ``Bearer ...``, URL passwords) redacted; ``None`` on success.
``duration_ms`` (float)
    Time spent in the transport, measured with a monotonic clock, sub-millisecond precision.
``completed_at`` (datetime)
    Aware UTC time the call ended.
"""
