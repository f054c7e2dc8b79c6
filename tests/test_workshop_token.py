"""A Workshop beyond loopback with no token given makes its own and logs the login URL.

In Kubernetes the guide's Secret may hold only the Anthropic key; the Workshop's
pod must still start. The token it makes is as strong as a configured one, valid
for the process, and the log line holding it is the one way to learn it. Here the
Workshop is made as in its pod (``--host 0.0.0.0``) but listens on loopback only.
"""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from heddle import Heddle
from heddle.errors import ConfigError
from heddle.testing import EmbeddedServers
from heddle.workshop import TOKEN_ENV, Workshop, check_bind
from heddle.workshop.web import SESSION_COOKIE
from tests.conftest import ROOT, wait_for
from tests.workshop_support import serving

LOGIN_LINE = re.compile(r"log in at (http://\S+/\?token=(\S+))")


@pytest.fixture(autouse=True)
def _no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_beyond_loopback_without_a_token_the_workshop_makes_one_instead_of_refusing() -> None:
    first = Workshop(Heddle("workshop"), host="0.0.0.0")
    second = Workshop(Heddle("workshop"), host="0.0.0.0")
    assert first.token_generated and second.token_generated
    assert first.token is not None and second.token is not None
    assert len(first.token) >= 32 and first.token != second.token, "random, and new for every process"
    assert first.sessions is not None, "the pages ask for it like for a configured token"
    check_bind("0.0.0.0", first.token)


def test_a_given_token_is_kept_a_short_one_is_refused_and_loopback_needs_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = "g1ven-" + "x" * 24
    monkeypatch.setenv(TOKEN_ENV, given)
    ws = Workshop(Heddle("workshop"), host="0.0.0.0")
    assert ws.token == given and not ws.token_generated
    assert Workshop(Heddle("workshop"), host="0.0.0.0", token="t" * 20).token == "t" * 20
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match="too short"):
        Workshop(Heddle("workshop"), host="0.0.0.0")
    monkeypatch.delenv(TOKEN_ENV)
    on_loopback = Workshop(Heddle("workshop"), host="127.0.0.1")
    assert on_loopback.token is None and not on_loopback.token_generated


def test_the_login_url_it_logs_once_signs_a_browser_in(
    heddle_servers: EmbeddedServers, caplog: pytest.LogCaptureFixture
) -> None:
    app = Heddle("workshop", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    ws = Workshop(app, host="0.0.0.0", port=0, config_dirs=[ROOT / "configs"])
    assert ws.token_generated
    ws.host = "127.0.0.1"  # as made in the pod, but listening on loopback only in a test
    with caplog.at_level(logging.WARNING, logger="heddle.workshop"), serving(ws):
        wait_for(lambda: any("log in at" in r.getMessage() for r in caplog.records), 10, "the login line")
        lines = [r for r in caplog.records if "log in at" in r.getMessage()]
        (line,) = lines
        assert line.levelno == logging.WARNING and line.name == "heddle.workshop"
        text = line.getMessage()
        assert TOKEN_ENV in text and "SECRET" in text
        found = LOGIN_LINE.search(text)
        assert found, text
        url, token = found.groups()
        assert token == ws.token and url == ws.login_url()
        with httpx.Client(timeout=10) as browser:
            assert browser.get(f"{ws.url}/").status_code == 401, "nobody gets in without it"
            assert browser.get(f"{ws.url}/?token=not-{token}").status_code == 401
            signed_in = browser.get(url, follow_redirects=True)
            assert signed_in.status_code == 200 and "token" not in str(signed_in.url)
            assert SESSION_COOKIE in browser.cookies
            assert browser.get(f"{ws.url}/tasks").status_code == 200, "the session cookie keeps it signed in"
    assert sum("log in at" in r.getMessage() for r in caplog.records) == 1, "logged once"
