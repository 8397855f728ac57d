"""factory-boy factories for users and ``RPCLog`` rows."""

from __future__ import annotations

import uuid
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from django_rpc_audit.models import RPCLog, RPCStatus


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", "password")

    @factory.post_generation
    def _save(obj: Any, create: bool, extracted: Any, **kwargs: Any) -> None:
        if create:
            obj.save()


class RPCLogFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RPCLog

    correlation_id = factory.LazyFunction(lambda: str(uuid.uuid4()))
    method = "system.ping"
    params = factory.LazyFunction(dict)
    response = factory.LazyFunction(lambda: {"pong": True})
    status = RPCStatus.SUCCESS
    duration_ms = 1.0
    caller_ip = "127.0.0.1"
    user_agent = "pytest"
    created_at = factory.LazyFunction(timezone.now)
    completed_at = factory.LazyFunction(timezone.now)
