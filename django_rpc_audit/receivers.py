"""The built-in receivers: turn ``rpc_started`` / ``rpc_finished`` into ``RPCLog`` rows."""

from __future__ import annotations

from typing import Any

from django_rpc_audit.conf import get_config
from django_rpc_audit.sampling import finished_sample_rate, started_is_logged
from django_rpc_audit.signals import (
    handles_events,
    idle_when,
    loop_safe,
    takes_deferred_payloads,
)
from django_rpc_audit.writers import get_writer, writer_buffers, writer_never_blocks

# While the writer in use only buffers (the buffered writer, the default), acall() calls these
# on the event loop, without a thread hop; with the sync writer they run in a worker thread.
# Sampling is pure computation (a hash of the correlation id), so it keeps them loop-safe.


def _logging_off() -> bool:
    return not get_config().enable_logging


def log_started_event(event: dict[str, Any]) -> None:
    """Hand a started call (``rpc_started``'s arguments, kept as they are) to the log writer,
    unless ``ENABLE_LOGGING`` is off or the call is not sampled."""
    config = get_config()
    if config.enable_logging and started_is_logged(config, event):
        get_writer().started(event)


def log_finished_event(event: dict[str, Any]) -> None:
    """Hand a finished call (``rpc_finished``'s arguments, kept) to the log writer with its
    ``sample_rate``, unless ``ENABLE_LOGGING`` is off or the call is not sampled."""
    config = get_config()
    if not config.enable_logging:
        return
    sample_rate = finished_sample_rate(config, event)
    if sample_rate is None:
        return
    event["sample_rate"] = sample_rate
    get_writer().finished(event)


# When these are the only live receivers, the client calls their event handlers directly
# (``handles_events``); otherwise Django's dispatch calls them.


@handles_events(log_started_event)
@idle_when(_logging_off)
@takes_deferred_payloads(writer_buffers)
@loop_safe(when=writer_never_blocks)
def log_rpc_started(sender: type, **kwargs: Any) -> None:
    """``rpc_started``'s receiver: :func:`log_started_event`."""
    # The signal made this dict for this receiver alone: it becomes the event.
    kwargs.pop("signal", None)
    log_started_event(kwargs)


@handles_events(log_finished_event)
@idle_when(_logging_off)
@takes_deferred_payloads(writer_buffers)
@loop_safe(when=writer_never_blocks)
def log_rpc_finished(sender: type, **kwargs: Any) -> None:
    """``rpc_finished``'s receiver: :func:`log_finished_event`."""
    kwargs.pop("signal", None)
    log_finished_event(kwargs)
