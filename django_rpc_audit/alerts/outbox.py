"""The outbox: an alert is a ``WebhookDelivery`` row written in the transaction of its log row.

The writers call :func:`enqueue_alerts` with the events of the rows they are writing, inside
the same transaction, so an alert exists exactly when its call is logged: a process that
crashes after the commit leaves its alerts for any other process to deliver, and a rolled-back
write leaves none. Rows have deterministic ids, so a retried batch adds no duplicates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import DatabaseError, transaction

from django_rpc_audit.alerts.endpoints import EVENT_FAILED, EVENT_SLOW, EVENT_TIMEOUT
from django_rpc_audit.alerts.payload import event_data
from django_rpc_audit.alerts.storm import group_key
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import stored_datetime

logger = logging.getLogger(__name__)

_DELIVERY_NAMESPACE = uuid.UUID("0b6c3f4e-2a4f-5d7e-9c1b-5e8f7a6d4c21")


def event_types(event: Mapping[str, Any]) -> list[str]:
    """The alert events a finished call raises: ``rpc.failed`` / ``rpc.timeout``, ``rpc.slow``."""
    types = []
    status = event.get("status")
    if status == RPCStatus.FAILED:
        types.append(EVENT_FAILED)
    elif status == RPCStatus.TIMEOUT:
        types.append(EVENT_TIMEOUT)
    if event.get("slow") is not None:
        types.append(EVENT_SLOW)
    return types


def delivery_id(endpoint: str, event_type: str, log_id: uuid.UUID) -> uuid.UUID:
    """The id (and so the ``webhook-id``) of one call's alert to one endpoint."""
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{endpoint}|{event_type}|{log_id}")


def enqueue_alerts(using: str, events: Iterable[Mapping[str, Any]]) -> int:
    """Add the alerts of the finished calls among ``events`` to the outbox; return how many.

    Call it inside the transaction that writes the events' rows. An event may name its row
    with ``log_id`` (otherwise it is derived from the correlation id and start time). Costs
    nothing without ``WEBHOOKS``. A failure to write them is logged and never fails the log
    rows (a savepoint keeps the surrounding transaction usable).
    """
    config = get_config()
    if not config.webhooks:
        return 0
    from django_rpc_audit.alerts import worker

    if config.webhook_delivery_thread:
        worker.ensure_worker()
    rows = _delivery_rows(config, events)
    if not rows:
        return 0
    from django_rpc_audit.alerts.models import WebhookDelivery

    try:
        with transaction.atomic(using=using):
            WebhookDelivery.objects.using(using).bulk_create(rows, ignore_conflicts=True)
    except DatabaseError:
        logger.exception("Could not queue %d webhook alert(s); the calls are logged.", len(rows))
        return 0
    if config.webhook_delivery_thread:
        transaction.on_commit(worker.wake, using=using)
    return len(rows)


def _delivery_rows(config: DjangoCfgRPCConfig, events: Iterable[Mapping[str, Any]]) -> list[Any]:
    from django_rpc_audit.alerts.models import WebhookDelivery
    from django_rpc_audit.writers.sink import call_log_id

    rows = []
    for event in events:
        if "status" not in event:
            continue  # a started call: nothing to say yet
        types = event_types(event)
        if not types:
            continue
        method = str(event["method"])
        # A stored row's event (the ingest worker's) names its row; the others are rebuilt.
        log_id = event.get("log_id") or call_log_id(event["correlation_id"], event["started_at"])
        code = str(event.get("error_code") or "")[:100]
        for event_type in types:
            kind_code = "" if event_type == EVENT_SLOW else code
            for endpoint in config.webhooks:
                if not endpoint.wants(event_type, method):
                    continue
                completed = stored_datetime(event["completed_at"])
                rows.append(
                    WebhookDelivery(
                        id=delivery_id(endpoint.name, event_type, log_id),
                        endpoint=endpoint.name,
                        event=event_type,
                        method=method[:255],
                        error_code=kind_code,
                        group_key=group_key(event_type, method, kind_code),
                        correlation_id=str(event["correlation_id"])[:64],
                        log_id=log_id,
                        occurred_at=completed,
                        payload=event_data(
                            endpoint, event_type, event, log_id, config.admin_base_url
                        ),
                        next_attempt_at=completed,
                    )
                )
    return rows
