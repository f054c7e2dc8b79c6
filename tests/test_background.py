"""Background loops stop for sure, even when a cancellation is swallowed on the way."""

from __future__ import annotations

import asyncio

from heddle.background import cancel_and_wait


async def test_a_loop_that_swallows_its_first_cancellation_is_cancelled_again_until_it_ends():
    rounds = 0

    async def loop() -> None:
        # What Python 3.11's asyncio.wait_for does when the awaited result and the
        # cancellation come at once: the cancellation is lost and the loop goes on.
        nonlocal rounds
        swallowed = False
        while True:
            rounds += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True

    task = asyncio.ensure_future(loop())
    await asyncio.sleep(0)
    plain = task
    plain.cancel()
    done, _ = await asyncio.wait((plain,), timeout=0.5)
    assert not done  # one cancel() is not enough: `cancel(); await task` would hang here
    await asyncio.wait_for(cancel_and_wait(task, None), 5)
    assert task.cancelled() and rounds == 2


async def test_a_failed_task_is_waited_for_and_its_error_not_reported_as_never_retrieved(caplog):
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.done() and isinstance(task.exception(), RuntimeError)
