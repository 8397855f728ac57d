"""The WSGI app gunicorn serves in the Prometheus multiprocess test (``metrics_app:application``).

Prometheus metrics on, the buffered writer writing every 0.1 s into the database that
``DATABASE_URL`` names, and local handlers that succeed, fail and time out; ``/call/<method>/``
makes one call and answers with the worker's pid, ``/metrics/`` sums every worker's metrics.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("DJANGO_CFG_RPC__WRITE_MODE", "buffered")
os.environ.setdefault("DJANGO_CFG_RPC__BUFFER_FLUSH_INTERVAL", "0.1")
os.environ.setdefault("DJANGO_CFG_RPC__PROMETHEUS_METRICS", "true")

import django  # noqa: E402

django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402

from django_rpc_audit.exceptions import RPCRemoteError  # noqa: E402
from django_rpc_audit.transports import register_local_handler  # noqa: E402


def fail(params: dict[str, object]) -> None:
    raise RPCRemoteError("user_offline", "User is offline")


register_local_handler("test.echo", lambda params: {"echo": params})
register_local_handler("test.fail", fail)
register_local_handler("test.slow", lambda params: time.sleep(0.03))

application = get_wsgi_application()
