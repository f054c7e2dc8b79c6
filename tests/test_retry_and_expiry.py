"""A task asks for a retry (``raise heddle.Retry(after_s=N)``), and a task expires (``expires=``) (#18 items 5, 6)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

import heddle
from heddle.testing import running_worker
from tests.conftest import wait_for


def test_retry_after_s_delays_the_next_attempt_and_counts_as_a_retry(heddle_app, heddle_worker):
    attempts: list[tuple[float, int]] = []

    @heddle_app.task(retries=3)
    def poll_upstream(job: str) -> str:
        attempts.append((time.time(), heddle.current_task().retries))
        if len(attempts) == 1:
            raise heddle.Retry(after_s=1.5)
        return f"{job} done"

    r = poll_upstream.delay("import")
    assert r.get(timeout=20) == "import done"
    assert [n for _, n in attempts] == [0, 1]
    # No earlier than after_s: the second attempt began at least 1.5 s after the first.
    assert attempts[1][0] - attempts[0][0] >= 1.5
    assert r.record is not None and r.record.retries == 1


def test_retry_uses_up_retries_and_the_final_failure_says_they_ran_out_with_the_cause(heddle_app, heddle_worker):
    calls = []

    # autoretry_for names another type: an explicit Retry is retried regardless.
    @heddle_app.task(retries=2, autoretry_for=(KeyError,))
    def fetch_quote(symbol: str) -> float:
        calls.append(heddle.current_task().retries)
        raise heddle.Retry(after_s=0.05, exc=ConnectionError(f"quote service down for {symbol}"))

    r = fetch_quote.delay("ACME")
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=20)
    assert calls == [0, 1, 2]
    assert info.value.type_name == "builtins.ConnectionError"
    assert "retries ran out (2 of 2 used)" in info.value.remote_message
    assert "quote service down for ACME" in info.value.remote_message
    assert r.state == heddle.FAILURE


def test_retry_without_retries_left_fails_at_once_and_says_so(heddle_app, heddle_worker):
    @heddle_app.task
    def once() -> None:
        raise heddle.Retry(after_s=5)

    with pytest.raises(heddle.TaskError) as info:
        once.delay().get(timeout=10)
    assert info.value.type_name == "heddle.errors.Retry"
    assert "retries ran out (0 of 0 used)" in info.value.remote_message


def test_retry_refuses_a_delay_that_is_not_seconds():
    with pytest.raises(TypeError, match="seconds >= 0"):
        heddle.Retry(after_s=-1)
    with pytest.raises(TypeError, match="seconds >= 0"):
        heddle.Retry(after_s=float("nan"))


def _past(at: float) -> None:
    wait_for(lambda: time.time() > at + 0.05, 10, "the expiry time to pass")


def test_a_task_not_started_before_it_expires_never_runs_and_ends_revoked(heddle_app):
    ran = threading.Event()

    @heddle_app.task
    def send_reminder(user: str) -> None:
        ran.set()

    deadline = datetime.now(UTC) + timedelta(milliseconds=300)
    r = send_reminder.apply_async(("ada",), expires=deadline)  # no worker yet
    _past(deadline.timestamp())
    with running_worker(heddle_app), pytest.raises(heddle.TaskExpired, match=r"expired at .* before a worker"):
        r.get(timeout=10)
    assert r.state == heddle.REVOKED
    assert isinstance(r.result, heddle.TaskRevoked)  # TaskExpired is a TaskRevoked
    assert not ran.is_set()


def test_the_task_option_expires_applies_to_every_send(heddle_app):
    @heddle_app.task(expires=0.3)
    def flash_sale(item: str) -> str:
        return item

    sent_at = time.time()
    r = flash_sale.delay("lamp")
    _past(sent_at + 0.3)
    with running_worker(heddle_app):
        with pytest.raises(heddle.TaskExpired):
            r.get(timeout=10)
        # Started in time, the same task runs.
        assert flash_sale.delay("chair").get(timeout=10) == "chair"


def test_a_delayed_task_that_starts_before_it_expires_runs(heddle_app, heddle_worker):
    @heddle_app.task
    def ping() -> str:
        return "pong"

    assert ping.apply_async(countdown=0.3, expires=60).get(timeout=10) == "pong"


def test_expires_that_could_never_be_met_or_is_not_a_time_fails_at_the_call_site(heddle_app):
    @heddle_app.task
    def noop() -> None: ...

    with pytest.raises(TypeError, match="could never run"):
        noop.apply_async(countdown=10, expires=5)
    with pytest.raises(TypeError, match="timezone-aware"):
        noop.apply_async(expires=datetime.now() + timedelta(seconds=5))
    with pytest.raises(TypeError, match="seconds > 0"):
        noop.apply_async(expires=-1)
    with pytest.raises(heddle.TaskOptionError, match=r"expires for task .* must be seconds > 0"):
        heddle_app.task(expires=0)(lambda: None)
