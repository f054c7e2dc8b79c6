"""The Workshop's session cookie: signed, expiring, never the token, Secure behind https.

Every test runs a real Workshop with a token (beyond loopback it insists on
one) and speaks HTTP to it; cookies are read from the ``Set-Cookie`` header
the browser would get and sent back by hand, as a forger would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie

import httpx
import pytest

from heddle.testing import EmbeddedServers
from heddle.workshop import Workshop
from heddle.workshop.web import SESSION_COOKIE, Sessions
from tests.conftest import wait_for
from tests.workshop_support import running_workshop

TOKEN = "t0ken-" + uuid.uuid4().hex


@pytest.fixture
def guarded(heddle_servers: EmbeddedServers) -> Iterator[Workshop]:
    """A Workshop that needs ``TOKEN``."""
    with running_workshop(heddle_servers, token=TOKEN) as ws:
        yield ws


def sign_in(ws: Workshop, headers: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Open ``/?token=`` as a browser would: the session cookie's value and its attributes (lower-case)."""
    r = httpx.get(f"{ws.url}/tasks", params={"token": TOKEN}, headers=headers or {}, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/tasks"
    (header,) = r.headers.get_list("set-cookie")
    morsel = SimpleCookie(header)[SESSION_COOKIE]
    attributes = {k.lower(): str(v) for k, v in morsel.items() if v}
    flags = {part.strip().lower() for part in header.split(";")}
    attributes.update({flag: "1" for flag in ("secure", "httponly") if flag in flags})
    return morsel.value, attributes


def status_with(ws: Workshop, cookie: str, path: str = "/dlq") -> httpx.Response:
    return httpx.get(f"{ws.url}{path}", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}, timeout=10)


def test_the_session_cookie_is_signed_not_the_token_and_is_httponly_strict_and_expiring(guarded: Workshop) -> None:
    value, attributes = sign_in(guarded)
    assert TOKEN not in value and TOKEN[6:] not in value
    assert attributes["httponly"] and attributes["samesite"].lower() == "strict" and attributes["path"] == "/"
    assert 0 < int(attributes["max-age"]) <= 8 * 3600
    assert "secure" not in attributes, "plain http on loopback: a Secure cookie would never come back"
    assert status_with(guarded, value).status_code == 200
    # The token itself, where the old Workshop put it, no longer opens anything.
    for name in (SESSION_COOKIE, "heddle_workshop_token"):
        r = httpx.get(f"{guarded.url}/dlq", headers={"Cookie": f"{name}={TOKEN}"}, timeout=10)
        assert r.status_code == 401, name


def test_an_expired_session_is_refused_and_cleared(heddle_servers: EmbeddedServers) -> None:
    with running_workshop(heddle_servers, token=TOKEN, session_ttl_s=1.0) as ws:
        value, attributes = sign_in(ws)
        assert attributes["max-age"] == "1"
        wait_for(lambda: status_with(ws, value).status_code == 401, 10, "the session to expire")
        r = status_with(ws, value)
        assert "expired" in r.text and "?token=" in r.text
        cleared = SimpleCookie(r.headers["set-cookie"])[SESSION_COOKIE]
        assert cleared.value == "" and cleared["max-age"] == "0"
    # A session signed with the right key whose expiry has passed, as a stolen old cookie would be.
    with running_workshop(heddle_servers, token=TOKEN) as ws:
        old = Sessions(TOKEN).issue(now=time.time() - 9 * 3600)
        assert status_with(ws, old).status_code == 401
        assert status_with(ws, Sessions(TOKEN).issue()).status_code == 200


def test_a_tampered_or_foreign_session_is_refused(guarded: Workshop) -> None:
    value, _ = sign_in(guarded)
    version, expiry, signature = value.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    forged = [
        f"{version}.{int(expiry) + 3600}.{signature}",  # a longer life under the old signature
        f"{version}.{expiry}.{flipped}",  # one character of the signature changed
        f"{version}.{expiry}.",  # no signature
        f"v0.{expiry}.{signature}",  # another version
        f"{version}.{expiry}",  # not three parts
        f"{version}.{expiry}.{signature}.extra",
        "garbage",
        Sessions("another-token-" + uuid.uuid4().hex).issue(),  # signed by another Workshop's key
        Sessions(TOKEN, ttl_s=30 * 24 * 3600).issue(),  # right key, but a life far beyond this Workshop's
    ]
    for cookie in forged:
        assert status_with(guarded, cookie).status_code == 401, cookie
    assert status_with(guarded, value).status_code == 200  # the real one still works


@pytest.mark.parametrize(
    ("headers", "secure"),
    [
        ({"X-Forwarded-Proto": "https"}, True),
        ({"X-Forwarded-Proto": "https, http"}, True),  # the first hop is the browser's
        ({"Forwarded": 'for=192.0.2.1;proto=https;host="heddle.example"'}, True),
        ({"X-Forwarded-Proto": "http"}, False),
        ({}, False),
    ],
    ids=["x-forwarded-proto", "a-proxy-chain", "forwarded", "forwarded-http", "direct-http"],
)
def test_the_cookie_is_secure_when_the_browser_came_over_https(
    guarded: Workshop, headers: dict[str, str], secure: bool
) -> None:
    value, attributes = sign_in(guarded, headers)
    assert ("secure" in attributes) is secure
    assert attributes["httponly"] and attributes["samesite"].lower() == "strict"
    assert TOKEN not in value
    assert status_with(guarded, value).status_code == 200


def test_sessions_never_show_their_key(guarded: Workshop) -> None:
    assert guarded.sessions is not None
    assert TOKEN not in repr(guarded.sessions) and repr(guarded.sessions) == "<Sessions ttl_s=28800>"
