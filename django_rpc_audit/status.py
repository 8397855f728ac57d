"""``RPCStatus``: how a call ended, shared by the client, the QuerySet and the model."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class RPCStatus(models.TextChoices):
    """How a call ended; ``PENDING`` while it is in flight."""

    PENDING = "pending", _("Pending")
    SUCCESS = "success", _("Success")
    FAILED = "failed", _("Failed")
    TIMEOUT = "timeout", _("Timeout")
    #: Over its ``RATE_LIMITS`` limit: refused before it was sent.
    RATE_LIMITED = "rate_limited", _("Rate limited")
