"""Delivery: claim due outbox rows, apply storm control, POST them signed, retry or give up.

One pass (:func:`deliver_due`) runs in three steps, so that no database transaction is held
open across an HTTP request:

1. **Claim**, in one short transaction: the due ``pending`` rows are locked with
   ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL; other databases serialise writers
   instead), so several processes share the work without sending a row twice. An event not yet
   seen by storm control opens its window (it is sent) or joins the open one (it is marked
   ``grouped`` and counted in the window's digest); a due digest freezes its count. Each row
   to send gets a lease: its ``next_attempt_at`` moves past the request's longest time, so a
   process killed mid-request leaves the row to be retried by another, with the same
   ``webhook-id``.
2. **Send**, outside any transaction: one signed POST per row.
3. **Record** the outcome: ``delivered`` on 2xx; on a network error, a timeout, 408, 425, 429
   or 5xx a retry after the next step of ``WEBHOOK_RETRY_SCHEDULE`` (jittered, and never
   before the endpoint's ``Retry-After``), or ``failed`` once the schedule has run out; 410
   disables the endpoint; any other answer fails the row at once.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, router, transaction
from django.db.models import F, Max, Min
from django.utils import timezone

from django_rpc_audit.alerts import payload as payloads
from django_rpc_audit.alerts.endpoints import WebhookEndpoint
from django_rpc_audit.alerts.models import (
    DeliveryKind,
    DeliveryState,
    WebhookDelivery,
    WebhookEndpointState,
)
from django_rpc_audit.alerts.signing import signed_headers
from django_rpc_audit.alerts.storm import StormControl
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config

logger = logging.getLogger(__name__)

#: Rows claimed per pass.
BATCH_SIZE = 100
#: Jitter of each retry delay: a factor drawn uniformly from this range.
JITTER = (0.8, 1.2)
#: Longest ``Retry-After`` honoured (seconds); a longer one is cut to this.
MAX_RETRY_AFTER = 86_400.0
#: Statuses that are retried; every other non-2xx answer (but 410) fails the row at once.
RETRY_STATUSES = frozenset({408, 425, 429})
#: Bytes of a response body read (and thrown away) before the connection is closed.
_READ_LIMIT = 65_536


def lease_seconds(config: DjangoCfgRPCConfig) -> float:
    """How long a claimed row is left to its claimer before another process may retry it."""
    return 2 * config.webhook_timeout + 1


def digest_settle_seconds(window: float) -> float:
    """Wait after a window closes before its digest counts: alerts grouped in its last moments
    commit first."""
    return min(2.0, window / 2)


@dataclass
class DeliveryReport:
    """What one :func:`deliver_due` pass did."""

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    grouped: int = 0
    skipped: int = 0
    cancelled: int = 0
    status_codes: list[int | None] = field(default_factory=list)

    def __iadd__(self, other: DeliveryReport) -> DeliveryReport:
        for name in (
            "claimed",
            "delivered",
            "retrying",
            "failed",
            "grouped",
            "skipped",
            "cancelled",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.status_codes += other.status_codes
        return self


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one POST ended."""

    status_code: int | None
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        code = self.status_code
        return code is None or code in RETRY_STATUSES or code >= 500


_storm: StormControl | None = None
_storm_url: str | None = None


def storm_control(config: DjangoCfgRPCConfig) -> StormControl:
    """The process's storm control, on ``REDIS_URL``."""
    global _storm, _storm_url
    if _storm is None or _storm_url != config.redis_url:
        _storm, _storm_url = StormControl(config.redis_url), config.redis_url
    return _storm


def deliver_due(*, limit: int = BATCH_SIZE, using: str | None = None) -> DeliveryReport:
    """Claim up to ``limit`` due rows, send them, record the outcomes; one pass.

    ::

        while deliver_due().claimed:
            pass
    """
    config = get_config()
    alias = using or router.db_for_write(WebhookDelivery)
    report = DeliveryReport()
    claimed = _claim(config, alias, limit, report)
    for row, endpoint in claimed:
        attempt = send(endpoint, row)
        _record(config, alias, row, attempt, report)
    return report


def _claim(
    config: DjangoCfgRPCConfig, alias: str, limit: int, report: DeliveryReport
) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
    endpoints = {endpoint.name: endpoint for endpoint in config.webhooks}
    now = timezone.now()
    lease = timedelta(seconds=lease_seconds(config))
    claimed: list[tuple[WebhookDelivery, WebhookEndpoint]] = []
    with transaction.atomic(using=alias):
        due = (
            WebhookDelivery.objects.using(alias)
            .filter(state=DeliveryState.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at")
        )
        if connections[alias].features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True)
        rows = list(due[:limit])
        report.claimed += len(rows)
        if not rows:
            return claimed
        disabled = set(
            WebhookEndpointState.objects.using(alias)
            .filter(disabled_at__isnull=False)
            .values_list("name", flat=True)
        )
        # Fresh events by kind, oldest first: storm control decides once per kind and batch.
        fresh: dict[tuple[str, str], list[WebhookDelivery]] = {}
        for row in rows:
            endpoint = endpoints.get(row.endpoint)
            if endpoint is None or row.endpoint in disabled:
                why = "endpoint disabled" if endpoint is not None else "endpoint not configured"
                _finish(alias, row, DeliveryState.CANCELLED, error=why)
                report.cancelled += 1
            elif row.kind == DeliveryKind.EVENT and not row.storm_checked:
                fresh.setdefault((row.endpoint, row.group_key), []).append(row)
            elif row.kind == DeliveryKind.DIGEST and row.payload is None:
                if _freeze_digest(config, alias, row, endpoint):
                    claimed.append((row, endpoint))
                else:
                    report.skipped += 1
            else:
                claimed.append((row, endpoint))
        for (name, _), events in fresh.items():
            send_now = _open_or_join_window(config, alias, events, endpoints[name], now)
            report.grouped += len(events) - len(send_now)
            claimed += [(row, endpoints[name]) for row in send_now]
        # One statement leases every row to send (the per-row changes were written above).
        for row, _ in claimed:
            row.attempts += 1
            row.last_attempt_at = now
            row.next_attempt_at = now + lease
        WebhookDelivery.objects.using(alias).filter(pk__in=[row.pk for row, _ in claimed]).update(
            attempts=F("attempts") + 1, last_attempt_at=now, next_attempt_at=now + lease
        )
    return claimed


def _window_seconds(config: DjangoCfgRPCConfig, endpoint: WebhookEndpoint) -> float:
    if endpoint.group_window_seconds is not None:
        return endpoint.group_window_seconds
    return config.webhook_group_window_seconds


def _open_or_join_window(
    config: DjangoCfgRPCConfig,
    alias: str,
    events: list[WebhookDelivery],
    endpoint: WebhookEndpoint,
    now: datetime,
    *,
    again: bool = True,
) -> list[WebhookDelivery]:
    """Storm control for fresh events of one kind (oldest first); returns those to send now.

    One Redis command for the batch: the first event opens the window (and is sent) or joins
    the open one; the others join the same window and are counted in its digest.
    """
    first = events[0]
    seconds = _window_seconds(config, endpoint)
    window = storm_control(config).window(endpoint.name, first.group_key, seconds)
    due = datetime.fromtimestamp(window.ends_at, tz=now.tzinfo) + timedelta(
        seconds=digest_settle_seconds(seconds)
    )
    digests = WebhookDelivery.objects.using(alias).filter(pk=window.digest_id)
    digest = None if window.opened else digests.select_for_update().first()
    if digest is None:
        # Made by whoever opened the window; also by a joiner, in case the opener died before
        # committing it (ignored when it exists).
        WebhookDelivery.objects.using(alias).bulk_create(
            [
                WebhookDelivery(
                    id=window.digest_id,
                    endpoint=first.endpoint,
                    event=first.event,
                    kind=DeliveryKind.DIGEST,
                    method=first.method,
                    error_code=first.error_code,
                    group_key=first.group_key,
                    occurred_at=first.occurred_at,
                    payload=None,
                    storm_checked=True,
                    next_attempt_at=due,
                )
            ],
            ignore_conflicts=True,
        )
    for row in events:
        row.storm_checked = True
        row.digest_id = window.digest_id
    if window.opened:
        events[0].save(using=alias, update_fields=["storm_checked", "digest_id"])
    send_now, joiners = (events[:1], events[1:]) if window.opened else ([], events)
    if not joiners:
        return send_now
    if digest is None:
        # Serialise with the digest's freeze: events join only a digest not yet counted.
        digest = digests.select_for_update().first()
    if digest is None or digest.payload is not None or digest.state != DeliveryState.PENDING:
        # Its digest was counted meanwhile (this claim outlived the window and its settling
        # time): the window has closed in Redis too, so ask for a new one, once.
        if again:
            return _open_or_join_window(config, alias, events, endpoint, now, again=False)
        return events
    WebhookDelivery.objects.using(alias).filter(pk__in=[row.pk for row in joiners]).update(
        state=DeliveryState.GROUPED,
        storm_checked=True,
        digest_id=window.digest_id,
        next_attempt_at=None,
    )
    return send_now


def _freeze_digest(
    config: DjangoCfgRPCConfig, alias: str, row: WebhookDelivery, endpoint: WebhookEndpoint
) -> bool:
    """Count what the digest groups and fix its body; False (skipped) when it groups nothing."""
    grouped = WebhookDelivery.objects.using(alias).filter(
        digest_id=row.id, state=DeliveryState.GROUPED
    )
    span = grouped.aggregate(first=Min("occurred_at"), last=Max("occurred_at"))
    if span["first"] is None:
        _finish(alias, row, DeliveryState.SKIPPED, error="")
        return False
    ids = list(
        grouped.order_by("occurred_at").values_list("correlation_id", flat=True)[
            : payloads.DIGEST_SAMPLE_IDS
        ]
    )
    payload = payloads.digest_data(
        event_type=row.event,
        method=row.method,
        error_code=row.error_code,
        count=grouped.count(),
        first_at=span["first"],
        last_at=span["last"],
        window_seconds=_window_seconds(config, endpoint),
        correlation_ids=ids,
        admin_base_url=config.admin_base_url,
    )
    row.payload = payload
    row.save(using=alias, update_fields=["payload"])
    return True


def _finish(alias: str, row: WebhookDelivery, state: str, *, error: str) -> None:
    row.state = state
    row.next_attempt_at = None
    row.last_error = error
    row.save(using=alias, update_fields=["state", "next_attempt_at", "last_error"])


def request_body(endpoint: WebhookEndpoint, row: WebhookDelivery) -> bytes:
    """The body of ``row``'s request (the same for every attempt)."""
    type_ = payloads.digest_type(row.event) if row.kind == DeliveryKind.DIGEST else row.event
    return payloads.body(endpoint, type_, row.occurred_at, row.payload or {})


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an instruction: following it would re-post the signed
    alert to wherever the endpoint points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def send(endpoint: WebhookEndpoint, row: WebhookDelivery) -> Attempt:
    """POST ``row`` to ``endpoint``, signed; never raises."""
    config = get_config()
    try:
        body = request_body(endpoint, row)
        headers = signed_headers(endpoint.key, row.webhook_id, int(time.time()), body)
    except Exception as exc:
        # Retried on the schedule, then failed, its error visible in the admin; never a loop
        # that stops every other delivery.
        logger.exception("Could not build webhook %s for %r.", row.webhook_id, row.endpoint)
        return Attempt(None, f"could not build the request: {type(exc).__name__}: {exc}"[:500])
    headers["User-Agent"] = "django-rpc-audit-webhooks"
    # The URL is an http(s) endpoint validated in the settings (no file: or custom schemes).
    request = urllib.request.Request(  # noqa: S310
        endpoint.url, data=body, headers=headers, method="POST"
    )
    try:
        with _opener.open(request, timeout=config.webhook_timeout) as response:
            response.read(_READ_LIMIT)
            return Attempt(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            retry_after = _retry_after(exc.headers.get("Retry-After"))
            return Attempt(exc.code, f"HTTP {exc.code}", retry_after)
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        reason = getattr(exc, "reason", exc)
        return Attempt(None, f"{type(exc).__name__}: {reason}"[:500])


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), capped; ``None`` if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, (when - timezone.now()).total_seconds()), MAX_RETRY_AFTER)


def retry_delay(
    config: DjangoCfgRPCConfig, attempts: int, retry_after: float | None
) -> float | None:
    """Seconds before the next try after ``attempts`` tries; ``None``: give up."""
    schedule = config.webhook_retry_schedule
    if attempts > len(schedule):
        return None
    delay = schedule[attempts - 1] * random.uniform(*JITTER)  # noqa: S311  (jitter, not crypto)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def _record(
    config: DjangoCfgRPCConfig,
    alias: str,
    row: WebhookDelivery,
    attempt: Attempt,
    report: DeliveryReport,
) -> None:
    now = timezone.now()
    report.status_codes.append(attempt.status_code)
    changes: dict[str, Any] = {
        "last_status_code": attempt.status_code,
        "last_error": attempt.error,
        "next_attempt_at": None,
    }
    if attempt.ok:
        changes["state"] = DeliveryState.DELIVERED
        report.delivered += 1
    elif attempt.status_code == 410:
        changes["state"] = DeliveryState.CANCELLED
        changes["last_error"] = "410 Gone: endpoint disabled"
        WebhookEndpointState.objects.using(alias).update_or_create(
            name=row.endpoint,
            defaults={"disabled_at": now, "disabled_reason": "The endpoint answered 410 Gone."},
        )
        logger.warning("Webhook endpoint %r answered 410 Gone: disabled.", row.endpoint)
        report.cancelled += 1
    elif (
        attempt.retryable
        and (delay := retry_delay(config, row.attempts, attempt.retry_after)) is not None
    ):
        changes["next_attempt_at"] = now + timedelta(seconds=delay)
        report.retrying += 1
    else:
        changes["state"] = DeliveryState.FAILED
        report.failed += 1
        logger.warning(
            "Webhook %s to %r failed after %d attempt(s): %s",
            row.webhook_id,
            row.endpoint,
            row.attempts,
            attempt.error or attempt.status_code,
        )
    # Only if nobody re-queued the row meanwhile ("send again" resets the attempts).
    WebhookDelivery.objects.using(alias).filter(pk=row.pk, attempts=row.attempts).update(**changes)


def resend(queryset: Any) -> int:
    """Queue the deliveries of ``queryset`` again, now, with their schedule restarted and the
    same ``webhook-id``; grouped events stay counted in their digest. Returns how many."""
    return int(
        queryset.exclude(state=DeliveryState.GROUPED)
        .exclude(kind=DeliveryKind.DIGEST, payload__isnull=True)
        .update(
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=timezone.now(),
            last_error="",
        )
    )


def prune_deliveries(days: float, *, batch_size: int = 5_000, dry_run: bool = False) -> int:
    """Delete deliveries created more than ``days`` days ago that are done with (every state
    but ``pending``), in batches of ``batch_size``, each its own transaction; return how many
    (with ``dry_run``: would be). ``rpc_logs_cleanup`` calls it with the logs' retention."""
    alias = router.db_for_write(WebhookDelivery)
    done = WebhookDelivery.objects.using(alias).exclude(state=DeliveryState.PENDING)
    old = done.filter(created_at__lt=timezone.now() - timedelta(days=days))
    if dry_run:
        return old.count()
    deleted = 0
    while True:
        with transaction.atomic(using=alias):
            ids = list(old.order_by("created_at").values_list("pk", flat=True)[:batch_size])
            count = WebhookDelivery.objects.using(alias).filter(pk__in=ids).delete()[0]
        deleted += count
        if count < batch_size:
            return deleted
