"""Secrets in hostile shapes never reach a receiver or a row; a Redis password never prints."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rpc_audit import get_rpc_client
from django_rpc_audit.checks import check_settings
from django_rpc_audit.client import RPCClient
from django_rpc_audit.conf import DjangoCfgRPCConfig, validate_redis_url
from django_rpc_audit.exceptions import RPCConnectionError, RPCRemoteError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.redaction import Redactor, is_secret_key, redact_text
from django_rpc_audit.utils import redact_url

pytestmark = pytest.mark.django_db

SECRET = "s3cr3t-VALUE-42"


# -- item 1: digit suffixes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["password1", "password2", "new_password1", "new_password2", "token2", "apiKey3"]
)
def test_trailing_digits_do_not_hide_the_secret_word(key):
    assert is_secret_key(key)
    assert Redactor().value({key: SECRET}) == {key: "***"}
    assert redact_text(f"{key}={SECRET}") == f"{key}=***"


def test_django_password_change_form_fields_are_not_stored(echo_handler, signals):
    params = {"old_password": SECRET, "new_password1": SECRET, "new_password2": SECRET}
    get_rpc_client().call("test.echo", params)
    assert SECRET not in repr(signals.started + signals.finished)
    assert SECRET not in json.dumps(RPCLog.objects.get().params)


# -- item 2: authorization schemes and values with spaces ----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b",
            "Authorization: Token ***",
        ),
        ("Authorization: ApiKey 9944b09199c62bcf", "Authorization: ApiKey ***"),
        ('Authorization: Digest username="bob", response="6629fae4"', "Authorization: Digest ***"),
        ("Proxy-Authorization: Basic dXNlcjpwYXNz", "Proxy-Authorization: Basic ***"),
        ("authorization: opaque-credential-42 more", "authorization: ***"),
        ("sent Token 9944b09199c62bcf9418 twice", "sent Token *** twice"),
        ("ApiKey abcdef123456 rejected", "ApiKey *** rejected"),
        ("password: correct horse battery staple\nnext", "password: ***\nnext"),
        ("X-Api-Key: abc def ghi", "X-Api-Key: ***"),
        ("Token expired", "Token expired"),
    ],
)
def test_authorization_values_are_redacted_whole(text, expected):
    assert redact_text(text) == expected


def test_an_error_echoing_a_token_header_is_stored_without_it(local_handler, signals):
    def broken(params):
        raise RPCRemoteError("denied", f"Authorization: Token {SECRET} was refused")

    local_handler("test.broken", broken)
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("test.broken")
    assert SECRET not in repr(signals.finished)
    assert SECRET not in RPCLog.objects.get().error_message


# -- item 3: common shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"headers": [["X-Api-Key", SECRET]]},
        {"headers": [("Authorization", f"Bearer {SECRET}")]},
        {"headers": [{"name": "X-Api-Key", "value": SECRET}]},
        {"har": {"cookies": [{"name": "sessionid", "value": SECRET, "path": "/"}]}},
        {"body": json.dumps({"user": "ann", "password": SECRET})},
        {"body": json.dumps({"auth": {"token": {"nested": SECRET}}})},
        {"body": json.dumps([{"name": "Authorization", "value": f"x{SECRET}"}])},
        {"yaml": f"db:\n  password: {SECRET}\n"},
    ],
)
def test_secrets_in_common_shapes_never_reach_a_receiver(params, echo_handler, signals):
    get_rpc_client().call("test.echo", params)
    assert SECRET not in repr(signals.started + signals.finished)
    row = RPCLog.objects.get()
    assert SECRET not in json.dumps(row.params)
    assert SECRET not in json.dumps(row.response)


def test_values_nested_beyond_the_depth_limit_are_withheld():
    deep: object = {"password_hint": "harmless", "leaf": f"token={SECRET}"}
    deep = {"secret_box": {"value": SECRET}}
    for _ in range(70):
        deep = {"next": deep}
    redacted = Redactor().value(deep)
    assert SECRET not in json.dumps(redacted)
    assert "nested deeper than" in json.dumps(redacted)


# -- item 4: the Redis password ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"redis://cache:6379/9?password={SECRET}",
        f"redis://:{SECRET}@cache:6379/9",
        f"redis://user:{SECRET}@cache:6379/9",
        "redis://:pa#ss" + SECRET + "@cache:6379/9",
        "redis://:pa?ss" + SECRET + "@cache:6379/9",
        "redis://:pa/ss" + SECRET + "@cache:6379/9",
        "redis://:p@ss" + SECRET + "@cache:6379/9",
    ],
)
def test_redact_url_never_prints_any_part_of_a_password(url):
    assert SECRET not in redact_url(url)
    assert "ss" + SECRET not in redact_url(url)


def test_a_query_string_password_is_not_in_errors_or_repr(rpc_settings):
    url = f"redis://127.0.0.1:1/9?password={SECRET}"
    rpc_settings(TRANSPORT="redis", REDIS_URL=url, RPC_TIMEOUT=1)
    client = get_rpc_client()
    assert SECRET not in repr(client)
    with pytest.raises(RPCConnectionError) as excinfo:
        client.call("system.ping")
    assert SECRET not in str(excinfo.value)
    assert SECRET not in repr(RPCClient(DjangoCfgRPCConfig(redis_url=url)))
    assert SECRET not in repr(DjangoCfgRPCConfig(redis_url=url))


@pytest.mark.parametrize("password", ["pa#ss" + SECRET, "pa?ss" + SECRET, "pa/ss" + SECRET])
def test_invalid_urls_hide_their_password_in_errors_and_checks(password, rpc_settings):
    url = f"redis://:{password}@cache:6379/x"
    with pytest.raises(ImproperlyConfigured) as excinfo:
        validate_redis_url(url)
    assert SECRET not in str(excinfo.value)
    rpc_settings(REDIS_URL=url)
    messages = [error.msg for error in check_settings()]
    assert messages
    assert all(SECRET not in message for message in messages)


# -- item 15: glob rules in the user's order -----------------------------------------------------


def test_method_rules_apply_in_the_order_written(local_handler, signals, rpc_settings):
    rpc_settings(REDACT_METHODS={"auth.login*": {"params": "drop"}, "auth.*": {"params": ["user"]}})
    local_handler("auth.login_sso", lambda params: {"ok": True})
    get_rpc_client().call("auth.login_sso", {"user": "ann", "otp_code": "123456"})
    assert signals.started[0]["params"] == {"_redacted": "dropped by a per-method rule"}
    assert "123456" not in json.dumps(RPCLog.objects.get().params)


def test_sample_rates_apply_in_the_order_written(rpc_settings):
    from django_rpc_audit.conf import get_config
    from django_rpc_audit.sampling import sample_rate_for

    rpc_settings(SAMPLE_RATES={"system.ping*": 0.0, "system.*": 1.0})
    assert sample_rate_for(get_config(), "system.ping_all") == 0.0
    rpc_settings(SAMPLE_RATES={"system.*": 1.0, "system.ping*": 0.0})
    assert sample_rate_for(get_config(), "system.ping_all") == 1.0


# -- item 17: deep params ------------------------------------------------------------------------

#: Deeper than the JSON encoder and decoder of any supported Python can go: Python 3.11 gives
#: up near 1,000 levels, 3.13 (whose C code has its own recursion limit) between 5,000 and
#: 20,000; either raises RecursionError, which the client must never let out.
TOO_DEEP_FOR_JSON = 100_000


def test_params_nested_too_deeply_raise_type_error_before_anything_is_sent(echo_handler, signals):
    deep: object = "leaf"
    for _ in range(TOO_DEEP_FOR_JSON):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deeply"):
        get_rpc_client().call("test.echo", {"deep": deep})
    assert signals.started == []
    assert not RPCLog.objects.exists()


def test_a_reply_nested_too_deeply_is_a_protocol_error(local_handler):
    from django_rpc_audit.exceptions import RPCProtocolError

    deep: object = 1
    for _ in range(TOO_DEEP_FOR_JSON):
        deep = [deep]
    local_handler("test.deep", lambda params: {"deep": deep})
    with pytest.raises(RPCProtocolError):
        get_rpc_client().call("test.deep")
    assert RPCLog.objects.get().error_code == "protocol_error"


# -- item 19: error messages keep their start and their end --------------------------------------


def test_a_long_error_message_keeps_its_start_and_its_end(local_handler, rpc_settings):
    rpc_settings(MAX_ERROR_MESSAGE_BYTES=1_000)
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 2_000 + "ValueError: boom"

    def broken(params):
        raise RPCRemoteError("internal_error", trace)

    local_handler("test.broken", broken)
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("test.broken")
    message = RPCLog.objects.get().error_message
    assert len(message.encode()) <= 1_000
    assert message.startswith("Traceback (most recent call last):")
    assert message.endswith("ValueError: boom")
    assert f"[truncated, {len(trace)} bytes]" in message
