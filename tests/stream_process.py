"""A web process in ``WRITE_MODE = "stream"`` for the log stream's process tests.

Run as ``python -m tests.stream_process CALLS WHO [wait]`` with ``DJANGO_CFG_RPC__LOG_STREAM``
and ``DJANGO_CFG_RPC__REDIS_URL`` set: makes ``CALLS`` calls (local transport), waits until
the stream writer has shipped them (``flush()``), prints one JSON line, then, with ``wait``,
sleeps until it is killed.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ["DJANGO_CFG_RPC__WRITE_MODE"] = "stream"

import django  # noqa: E402

django.setup()

from django_rpc_audit import get_rpc_client  # noqa: E402
from django_rpc_audit.transports import register_local_handler  # noqa: E402
from django_rpc_audit.writers import flush, writer_stats  # noqa: E402


def main(calls: int, who: str, wait: bool) -> None:
    register_local_handler("test.echo", lambda params: {"echo": params})
    client = get_rpc_client()
    for n in range(calls):
        client.call("test.echo", {"n": n, "who": who})
    shipped = flush(timeout=60)
    stats = writer_stats()
    print(json.dumps({"shipped": shipped, "written": stats.written, "dropped": stats.dropped}))
    sys.stdout.flush()
    if wait:
        time.sleep(600)  # killed by the test: no exit handler runs


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:4] == ["wait"])
