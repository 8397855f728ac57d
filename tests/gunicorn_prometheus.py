"""gunicorn configuration of the Prometheus multiprocess test: the setup the docs give."""

from django_rpc_audit.integrations.prometheus import child_exit, on_starting

__all__ = ["child_exit", "on_starting"]
