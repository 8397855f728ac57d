"""factory-boy factories for users and ``RPCLog`` rows, and logged-in test clients."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
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


def staff_client(*permissions: str) -> Client:
    """A test client logged in as a new staff user with these permission codenames."""
    user = UserFactory(username=f"staff-{uuid.uuid4().hex[:8]}", is_staff=True)
    for codename in permissions:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def bulk_logs(count: int, users: Sequence[Any], *, methods: int) -> None:
    """Insert ``count`` finished-looking rows in one ``bulk_create``: ``methods`` method names,
    every status and the ``users`` in turn, one second apart (wrapping after 3,000)."""
    now = timezone.now()
    RPCLog.objects.bulk_create(
        RPCLog(
            correlation_id=str(uuid.uuid4()),
            method=f"bulk.m{i % methods}",
            status=RPCStatus.values[i % 4],
            duration_ms=float(i % 900),
            user=users[i % len(users)],
            created_at=now - timedelta(seconds=i % 3000),
        )
        for i in range(count)
    )
