"""Analytics of a time window, answered from the log rows or from the rollups, as chosen.

:class:`CallWindow` gives the figures of :class:`~django_rpc_audit.querysets.RPCLogQuerySet`'s
analytics methods (``overview()``, ``stats_by_method()``, ``stats_by_user()``,
``calls_by_method()``, ``busiest_users()``, ``calls_over_time()``) for the calls made from
``since`` to ``until``, in the same shapes, from one of two sources:

- ``"rows"``: the log rows, through the QuerySet (exact percentiles, minute buckets, any
  ``since``); what retention deleted is gone;
- ``"rollups"``: the hourly rollups, completed by the rows not rolled up yet
  (:mod:`django_rpc_audit.rollups.read`): whole UTC hours, percentiles estimated from the
  duration histogram, and unchanged by ``rpc_logs_cleanup``;
- ``"auto"`` (the default): the rollups for windows longer than :data:`ROLLUPS_AFTER` (an
  hour), the rows otherwise. ::

    from datetime import timedelta
    from django.utils import timezone
    from django_rpc_audit.analytics import CallWindow

    month = CallWindow(timezone.now() - timedelta(days=30))  # rollups
    month.overview()["p95_duration_ms"]
    month.stats_by_method()[:5]
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from django.db import router
from django.utils import timezone

from django_rpc_audit.querysets import (
    _BUCKETS,
    _COUNT_NAMES,
    _OVERVIEW_PERCENTILES,
    Bucket,
    MethodCalls,
    MethodStats,
    Overview,
    TimeBucket,
    UserCalls,
    UserStats,
    _bucket_start,
    _overview,
    _timeline,
)
from django_rpc_audit.rollups.read import Coverage, Sums, coverage, percentile, window_sums
from django_rpc_audit.status import RPCStatus

if TYPE_CHECKING:
    from django_rpc_audit.querysets import RPCLogQuerySet

Source = Literal["auto", "rows", "rollups"]
SOURCES: tuple[str, ...] = ("auto", "rows", "rollups")
#: ``source="auto"`` reads the rollups for windows longer than this, the rows otherwise (an
#: hour: minute buckets and exact percentiles where they matter, as the dashboard does).
ROLLUPS_AFTER = dt.timedelta(hours=1)

#: Which count each status adds to (``total_calls`` counts them all).
_STATUS_COUNTS = {
    RPCStatus.SUCCESS.value: "success_count",
    RPCStatus.FAILED.value: "failed_count",
    RPCStatus.TIMEOUT.value: "timeout_count",
    RPCStatus.RATE_LIMITED.value: "rate_limited_count",
}


class CallWindow:
    """The calls made from ``since`` to ``until`` (default: now), read from ``source``.

    With the rollups, the window starts at the hour holding ``since`` (UTC hours: the
    rollups' bucket), and :attr:`since` says so. Counts are estimated totals under sampling
    (each row stands for ``1 / sample_rate`` calls) from either source, and so is the mean
    duration; the rollups' percentiles weigh rows the same way, the rows' are those of the
    logged calls.

    :raises ValueError: an unknown ``source``, or ``until`` before ``since``.
    """

    def __init__(
        self,
        since: dt.datetime,
        until: dt.datetime | None = None,
        *,
        source: Source = "auto",
        using: str | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}.")
        until = timezone.now() if until is None else until
        if until < since:
            raise ValueError(f"until ({until.isoformat()}) is before since ({since.isoformat()}).")
        if source == "auto":
            source = "rollups" if until - since > ROLLUPS_AFTER else "rows"
        from django_rpc_audit.models import RPCLog

        self.using: str = using or router.db_for_read(RPCLog)
        #: ``"rows"`` or ``"rollups"``: the source that answers.
        self.source: Literal["rows", "rollups"] = source
        self.until = until
        self._cover: Coverage | None = None
        self._read: dict[tuple[str, ...], dict[tuple[Any, ...], Sums]] = {}
        if self.source == "rollups":
            self._cover = coverage(since, until, using=self.using)
            since = self._cover.start
        #: The window's start: ``since``, or with the rollups the start of its hour.
        self.since = since

    def rows(self) -> RPCLogQuerySet:
        """The window's log rows (those retention has not deleted)."""
        from django_rpc_audit.models import RPCLog

        return RPCLog.objects.using(self.using).filter(
            created_at__gte=self.since, created_at__lte=self.until
        )

    @property
    def coverage(self) -> Coverage | None:
        """With the rollups, which hours they answer and from when the rows do."""
        return self._cover

    # -- the figures --------------------------------------------------------------------------

    def overview(self) -> Overview:
        """As :meth:`RPCLogQuerySet.overview`; with the rollups, the percentiles are the
        histogram's estimates (:func:`~django_rpc_audit.rollups.read.percentile`)."""
        if self._cover is None:
            return self.rows().overview()
        # By status from the sums by method and status, which the method tables read anyway.
        by_status: dict[tuple[Any, ...], Sums] = defaultdict(Sums)
        for (_method, status), sums in self._sums(("method", "status")).items():
            by_status[(status,)].merge(sums)
        everything = _merged(by_status.values())
        counts = _counts(by_status.items(), lambda key: None).get(None) or dict.fromkeys(
            _COUNT_NAMES, 0
        )
        estimates = {
            name: percentile(everything.histogram, fraction, everything.duration_max_ms)
            for name, fraction in _OVERVIEW_PERCENTILES.items()
        }
        return _overview(counts, estimates)

    def calls_by_method(self) -> list[MethodCalls]:
        """As :meth:`RPCLogQuerySet.calls_by_method`, busiest first."""
        if self._cover is None:
            return self.rows().calls_by_method()
        calls = [
            MethodCalls(
                method=method,
                **counts,  # type: ignore[typeddict-item]
                avg_duration_ms=sums.mean_duration_ms,
                max_duration_ms=sums.duration_max_ms,
            )
            for method, (counts, sums) in self._by("method").items()
        ]
        calls.sort(key=lambda item: (-item["total_calls"], item["method"]))
        return calls

    def stats_by_method(self) -> list[MethodStats]:
        """As :meth:`RPCLogQuerySet.stats_by_method`, busiest first; with the rollups, the
        95th percentile is the histogram's estimate."""
        if self._cover is None:
            return self.rows().stats_by_method()
        stats = [
            MethodStats(
                method=method,
                **counts,  # type: ignore[typeddict-item]
                avg_duration_ms=sums.mean_duration_ms,
                p95_duration_ms=percentile(sums.histogram, 0.95, sums.duration_max_ms),
            )
            for method, (counts, sums) in self._by("method").items()
        ]
        stats.sort(key=lambda item: (-item["total_calls"], item["method"]))
        return stats

    def busiest_users(self, limit: int = 10) -> list[UserCalls]:
        """As :meth:`RPCLogQuerySet.busiest_users`; with the rollups, a deleted user keeps
        their id and the username their calls were made under."""
        if self._cover is None:
            return self.rows().busiest_users(limit=limit)
        by_user = self._by("user_id")
        # As the rows order them: most calls (before rounding), then the user's id, None last.
        order = sorted(
            by_user.items(),
            key=lambda item: (-item[1][1].calls, item[0] is None, item[0] or 0),
        )[:limit]
        names = self._usernames([user_id for user_id, _ in order])
        return [
            UserCalls(
                user_id=user_id,
                username=names.get(user_id, sums.username or None),
                **counts,  # type: ignore[typeddict-item]
            )
            for user_id, (counts, sums) in order
        ]

    def stats_by_user(self) -> list[UserStats]:
        """As :meth:`RPCLogQuerySet.stats_by_user`, busiest first; with the rollups,
        ``caller_ip_count`` is ``None`` (they keep no addresses) and a deleted user keeps their
        id and the username their calls were made under."""
        if self._cover is None:
            return self.rows().stats_by_user()
        by_user = self._by("user_id")
        names = self._usernames(list(by_user))
        stats = [
            UserStats(
                user_id=user_id,
                username=names.get(user_id, sums.username or None),
                **counts,  # type: ignore[typeddict-item]
                caller_ip_count=None,
            )
            for user_id, (counts, sums) in by_user.items()
        ]
        stats.sort(key=lambda item: (-item["total_calls"], str(item["username"] or "")))
        return stats

    def calls_over_time(self, bucket: Bucket = "hour") -> list[TimeBucket]:
        """As :meth:`RPCLogQuerySet.calls_over_time` over the window: every bucket (``"minute"``
        and ``"hour"`` from the rows; ``"hour"`` and ``"day"`` from the rollups) in the current
        time zone, empty ones included. With the rollups, each UTC hour falls in the bucket
        holding its start (exact in time zones a whole number of hours from UTC)."""
        if bucket not in _BUCKETS:
            raise ValueError(f"bucket must be one of {', '.join(_BUCKETS)}, not {bucket!r}.")
        if self._cover is None:
            return self.rows().calls_over_time(since=self.since, until=self.until, bucket=bucket)
        if bucket == "minute":
            raise ValueError("the rollups count hours: ask for 'hour' or 'day' buckets.")
        per_hour = self._sums(("hour", "status"))
        starts = {hour: _bucket_start(hour, bucket) for hour in {key[0] for key in per_hour}}
        counts = _counts(per_hour.items(), lambda key: starts[key[0]])
        return _timeline(counts, self.since, self.until, bucket)

    # -- reading --------------------------------------------------------------------------------

    def _sums(self, dims: tuple[str, ...]) -> dict[tuple[Any, ...], Sums]:
        assert self._cover is not None
        if dims not in self._read:  # calls_by_method() and stats_by_method() share a read
            self._read[dims] = window_sums(self._cover, dims)
        return self._read[dims]

    def _by(self, name: str) -> dict[Any, tuple[dict[str, int], Sums]]:
        """Per value of ``name``: the rounded counts by outcome, and the summed figures."""
        grouped = self._sums((name, "status"))
        merged: dict[Any, Sums] = defaultdict(Sums)
        for (value, _status), sums in grouped.items():
            merged[value].merge(sums)
        counts = _counts(grouped.items(), lambda key: key[0])
        return {value: (counts[value], sums) for value, sums in merged.items()}

    @cached_property
    def _user_model(self) -> Any:
        from django.contrib.auth import get_user_model

        return get_user_model()

    def _usernames(self, user_ids: list[Any]) -> dict[Any, str | None]:
        """The current usernames of these users (as the rows' methods read them); a deleted
        user is absent, so their snapshot name stands."""
        users = self._user_model._default_manager.using(self.using).in_bulk(
            [user_id for user_id in user_ids if user_id is not None]
        )
        names: dict[Any, str | None] = {
            user_id: user.get_username() for user_id, user in users.items()
        }
        names[None] = None
        return names


def _merged(parts: Iterable[Sums]) -> Sums:
    total = Sums()
    for sums in parts:
        total.merge(sums)
    return total


def _counts(
    items: Iterable[tuple[tuple[Any, ...], Sums]], group: Callable[[tuple[Any, ...]], Any]
) -> dict[Any, dict[str, int]]:
    """Counts by outcome per ``group(key)`` (the key's last value is the status), rounded as
    the rows' methods round them: the weighted calls of each outcome summed, then rounded."""
    raw: dict[Any, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_COUNT_NAMES, 0.0))
    for key, sums in items:
        values = raw[group(key)]
        values["total_calls"] += sums.calls
        name = _STATUS_COUNTS.get(key[-1])
        if name is not None:
            values[name] += sums.calls
    return {
        value: {name: round(total) for name, total in values.items()}
        for value, values in raw.items()
    }
