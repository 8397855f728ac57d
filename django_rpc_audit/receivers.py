"""The built-in receivers: turn ``rpc_started`` / ``rpc_finished`` into ``RPCLog`` rows."""

from __future__ import annotations

from typing import Any

from django_rpc_audit.conf import get_config
from django_rpc_audit.signals import loop_safe
from django_rpc_audit.writers import get_writer, writer_never_blocks

# While the writer in use only buffers (the buffered writer, the default), acall() calls these
# on the event loop, without a thread hop; with the sync writer they run in a worker thread.


@loop_safe(when=writer_never_blocks)
def log_rpc_started(sender: type, **kwargs: Any) -> None:
    """Hand a started call to the log writer, unless ``ENABLE_LOGGING`` is off."""
    if get_config().enable_logging:
        kwargs.pop("signal", None)
        get_writer().started(kwargs)


@loop_safe(when=writer_never_blocks)
def log_rpc_finished(sender: type, **kwargs: Any) -> None:
    """Hand a finished call to the log writer, unless ``ENABLE_LOGGING`` is off."""
    if get_config().enable_logging:
        kwargs.pop("signal", None)
        get_writer().finished(kwargs)
