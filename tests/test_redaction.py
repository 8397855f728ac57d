"""Redaction: secret keys, secrets in text, per-method rules; receivers never see a secret."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.manual import RPCLogger
from django_rpc_audit.models import RPCLog
from django_rpc_audit.redaction import (
    _SEPARATORS,
    DROPPED,
    MethodRule,
    Redactor,
    _compact,
    is_secret_key,
    redact_text,
)

pytestmark = pytest.mark.django_db

SECRET = "s3cr3t-VALUE-42"


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "PASSWORD",
        "db_password",
        "passwd",
        "X-Api-Key",
        "api_key",
        "apikey",
        "apiKey",
        "accessToken",
        "access_token",
        "refresh-token",
        "Authorization",
        "HTTP_AUTHORIZATION",
        "Cookie",
        "set-cookie",
        "sessionid",
        "session",
        "csrfmiddlewaretoken",
        "csrf_token",
        "private_key",
        "privateKey",
        "client.secret",
        "jwt",
    ],
)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["monkey", "tokenizer_name", "keyboard", "author", "secretary", "passenger", "user_id", "key"],
)
def test_keys_that_only_contain_a_secret_word_are_not_secret(key):
    assert not is_secret_key(key)


def test_extra_keys_are_whole_words_too():
    assert is_secret_key("card_number", ["cardNumber"])
    assert is_secret_key("user-card-number", ["card_number"])
    assert not is_secret_key("cardinal", ["card"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "GET https://api.example.com/cb?code=1&access_token=abc123&state=x failed",
            "GET https://api.example.com/cb?code=1&access_token=***&state=x failed",
        ),
        ("https://h/?token=abc", "https://h/?token=***"),
        ("invalid token=abc123 for user", "invalid token=*** for user"),
        ('{"password": "hunter2", "user": "ann"}', '{"password": "***", "user": "ann"}'),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "Authorization: Bearer ***"),
        ("header was Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "header was Bearer ***"),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic ***"),
        ("Basic authentication failed", "Basic authentication failed"),
        ("cannot reach redis://:pw@cache:6379/2", "cannot reach redis://:***@cache:6379/2"),
        ("tokenizer_name=bert monkey=1", "tokenizer_name=bert monkey=1"),
    ],
)
def test_redact_text(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"password": "s3cr3t\\', '{"password": "***'),  # cut right after a backslash
        ("x password='s3cr3t\\", "x password='***"),
        ('{"password": "s3cr3t\\"still', '{"password": "***'),  # an escaped quote, then cut
    ],
)
def test_a_quoted_value_cut_at_the_end_of_a_cut_text_is_hidden_whole(text, expected):
    assert redact_text(text, cut=True) == expected


def test_values_are_redacted_recursively_and_the_input_is_not_changed():
    params = {
        "user": "ann",
        "password": SECRET,
        "nested": [{"X-Api-Key": SECRET, "monkey": "banana"}],
        "callback": f"https://h/cb?token={SECRET}",
        "headers": ("Authorization", f"Bearer {SECRET}"),
    }
    original = json.dumps(params)
    redacted = Redactor().value(params)
    assert SECRET not in repr(redacted)
    assert redacted["user"] == "ann"
    assert redacted["nested"][0] == {"X-Api-Key": "***", "monkey": "banana"}
    assert json.dumps(params) == original


def test_dataclass_and_pydantic_fields_are_redacted_too():
    """Objects the wire cannot carry still reach manual logging and local handlers' replies."""
    pydantic = pytest.importorskip("pydantic")

    @dataclasses.dataclass
    class Login:
        username: str
        password: str

    class Credentials(pydantic.BaseModel):
        client_id: str
        client_secret: str

    login = Login("ann", SECRET)
    params = {"login": login, "creds": Credentials(client_id="c", client_secret=SECRET)}
    redacted = Redactor().value(params)
    assert redacted["login"] == {"username": "ann", "password": "***"}
    assert redacted["creds"] == {"client_id": "c", "client_secret": "***"}
    assert login.password == SECRET  # the object itself is not changed

    RPCLogger.create_log("c-2", "legacy.login", params)
    row = RPCLog.objects.get()
    assert SECRET not in json.dumps(row.params)
    assert row.params["login"] == {"username": "ann", "password": "***"}


def test_method_rules_drop_or_keep_listed_fields():
    redactor = Redactor(
        method_rules=[
            ("auth.login", MethodRule(params="drop", response=("user_id", "token"))),
            ("billing.*", MethodRule(params=("amount",))),
        ]
    )
    assert redactor.params("auth.login", {"user": "ann"}) == DROPPED
    assert redactor.response("auth.login", {"user_id": 7, "token": SECRET, "extra": 1}) == {
        "user_id": 7,
        "token": "***",  # a kept field is still redacted
    }
    assert redactor.params("billing.charge", {"amount": 5, "card": "4111"}) == {"amount": 5}
    assert redactor.params("other", {"card": "4111"}) == {"card": "4111"}


def _secret_handler(params):
    return {"session": SECRET, "ok": True, "echo": params}


CARD = "4111111111111111"


def test_receivers_never_see_secrets_but_the_handler_and_caller_do(
    local_handler, signals, rpc_settings
):
    rpc_settings(REDACT_KEYS=["card_number"])
    received = []

    def handler(params):
        received.append(params)
        return _secret_handler(params)

    local_handler("test.secret", handler)
    # A whole card number: a short one ("4111") turned up once in an event's repr, inside the
    # digits of ``duration_ms``.
    params = {"password": SECRET, "card_number": CARD, "user": "ann"}
    result = get_rpc_client().call("test.secret", params)

    # The peer and the caller get the real values ...
    assert received == [params]
    assert result["session"] == SECRET
    assert params["password"] == SECRET
    # ... no receiver, and no row, ever sees them.
    for event in signals.started + signals.finished:
        assert SECRET not in repr(event)
        assert CARD not in repr(event)
    assert signals.finished[0]["response"]["ok"] is True
    row = RPCLog.objects.get()
    assert row.params == {"password": "***", "card_number": "***", "user": "ann"}
    assert row.response["session"] == "***"


def test_secrets_echoed_in_an_error_message_are_redacted(local_handler, signals):
    def broken(params):
        raise RPCRemoteError("auth_failed", f"token={SECRET} rejected for Bearer {SECRET}")

    local_handler("test.broken", broken)
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("test.broken")
    assert SECRET in excinfo.value.message  # the caller keeps the real message
    assert signals.finished[0]["error_message"] == "token=*** rejected for Bearer ***"
    assert RPCLog.objects.get().error_message == "token=*** rejected for Bearer ***"


def test_per_method_rule_from_settings(local_handler, signals, rpc_settings):
    rpc_settings(REDACT_METHODS={"test.*": {"params": "drop", "response": ["ok"]}})
    local_handler("test.secret", _secret_handler)
    get_rpc_client().call("test.secret", {"anything": SECRET})
    row = RPCLog.objects.get()
    assert row.params == DROPPED
    assert row.response == {"ok": True}
    assert SECRET not in repr(signals.started)


@pytest.mark.redis
def test_the_wire_payload_is_unchanged(redis_client, redis_transport, signals):
    params = {"password": SECRET, "user": "ann"}
    get_rpc_client().fire_and_forget("test.secret", params)
    [(_, fields)] = redis_client.xrange(redis_transport)
    payload = json.loads(fields[b"payload"])
    assert payload["params"] == {"password": SECRET, "user": "ann"}
    assert signals.started[0]["params"] == {"password": "***", "user": "ann"}
    assert RPCLog.objects.get().params == {"password": "***", "user": "ann"}


def test_manual_logging_is_redacted_too():
    log = RPCLogger.create_log("c-1", "legacy.login", {"password": SECRET})
    RPCLogger.mark_failed(log, "denied", f"bad password={SECRET}", duration_ms=1.0)
    row = RPCLog.objects.get()
    assert row.params == {"password": "***"}
    assert row.error_message == "bad password=***"


def test_a_failing_redaction_withholds_the_value_and_the_call_goes_on(
    local_handler, signals, monkeypatch
):
    def explode(self, value):
        raise RuntimeError("bug")

    monkeypatch.setattr(Redactor, "value", explode)
    local_handler("test.secret", _secret_handler)
    assert get_rpc_client().call("test.secret", {"password": SECRET})["ok"] is True
    assert SECRET not in repr(signals.started + signals.finished)
    assert RPCLog.objects.get().status == "success"


@given(
    st.text(
        alphabet=st.one_of(
            st.sampled_from("_.- \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2003\u3000aZ9"),
            st.characters(),
        ),
        max_size=40,
    )
)
def test_a_keys_separators_go_as_the_pattern_says(key: str) -> None:
    """The fast path (underscores, then letters and digits alone) removes exactly what
    ``_SEPARATORS`` removes: whitespace of any kind, ``_``, ``.``, ``-``."""
    assert _compact(key) == _SEPARATORS.sub("", key)
