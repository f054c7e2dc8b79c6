"""Priority bands on a worker: high and low priority tasks beside the default ones.

``apply_async(priority=0..9)`` (9 highest, default 5) puts a task in one of
three bands. The default band (4-6) is the worker subject every task used
before priorities existed, consumed by the worker's main loop exactly as
before; ``high`` (7-9) and ``low`` (0-3) have a subject and a durable consumer
of their own (``heddle.tasks.{worker_type}.{tier}.high``, consumer
``heddle-{worker_type}+high``). Within a band, tasks start in the order they
were sent; a band's priorities are not ordered among themselves.

Each band has a small loop here that keeps at most one of its messages
*held*, fetched ahead and kept alive with in-progress acks like running work:

- A held **high** task is the first thing the worker takes when a slot is
  free, before any default task is fetched. While the worker is idle it
  starts at once.
- A held **low** task starts when the worker has a free slot and its last
  look at the default band found nothing; under a steady stream of default
  tasks it still starts once it has been held :data:`LOW_AGING_S` seconds, so
  low priorities progress by at least one task per worker per that time.

High tasks are served strictly first: a worker fed high tasks without end runs
no others. Holding one message per band means a worker has at most two tasks
fetched but not started, and a worker with free slots never leaves a held task
waiting, so none is kept from an idle replica for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol

from heddle import names
from heddle.actor import acknowledge, dead_letter_exhausted
from heddle.background import cancel_and_wait
from heddle.pull import Feed

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from heddle.connections import Connections

log = logging.getLogger("heddle.worker")

# How long a held low-priority task waits behind default ones before it starts anyway.
LOW_AGING_S: Final = 10.0


class Host(Protocol):
    """What the bands need of their worker (:class:`heddle.worker.Worker`)."""

    worker_type: str
    tier: str | None
    name: str
    max_deliver: int
    backoff_s: float
    fetch_timeout_s: float
    exhausted_why: str
    normal_idle: bool

    @property
    def stopping(self) -> bool: ...

    @property
    def stop_event(self) -> asyncio.Event: ...

    @property
    def subscriptions(self) -> list[Any]: ...

    def free_slots(self) -> int: ...

    def on_exhausted(self) -> None: ...

    async def handle(self, msgs: list[Msg]) -> None: ...


class Band:
    """One priority band's consumer and its held message."""

    def __init__(self, name: str, feed: Feed) -> None:
        self.name = name
        self.feed = feed
        self.held: Msg | None = None
        self.held_at = 0.0
        self.wake = asyncio.Event()

    def take(self) -> Msg | None:
        msg, self.held = self.held, None
        return msg


class Bands:
    """The high and low bands of one worker."""

    def __init__(self, worker: Host) -> None:
        self.worker = worker
        self.bands: dict[str, Band] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, conns: Connections) -> None:
        """Create and bind the band consumers, follow their max-deliveries advisories, start the loops."""
        w = self.worker
        broker = conns.broker
        for name in names.BANDS:
            durable = names.band_consumer(w.worker_type, w.tier, name)
            subject = names.band_filter(w.worker_type, w.tier, name)

            async def ensure(durable: str = durable, subject: str = subject) -> tuple[str, str]:
                await broker.ensure_named_consumer(durable, subject, max_deliver=w.max_deliver)
                return durable, names.TASKS_STREAM

            feed = Feed(broker, ensure, w.stop_event, f"{name}-priority tasks", w.backoff_s)
            await feed.start()
            band = self.bands[name] = Band(name, feed)

            async def exhausted(msg: Msg, durable: str = durable, subject: str = subject) -> None:
                if await dead_letter_exhausted(
                    conns, msg.data, stream=names.TASKS_STREAM, consumer=durable, filter_subject=subject,
                    max_deliver=w.max_deliver, actor=w.name, why=w.exhausted_why,
                ):
                    w.on_exhausted()

            advisory = names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer=durable)
            w.subscriptions.append(await broker.subscribe(advisory, cb=exhausted))
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(band), name=f"heddle-band-{name}"))

    def held(self) -> Iterator[Msg]:
        """Messages held ahead (kept alive with in-progress acks)."""
        return (b.held for b in self.bands.values() if b.held is not None)

    def next_for_free_slot(self, normal_idle: bool) -> Msg | None:
        """What a free slot takes before the default band: a held high task, or an aged or unopposed low one."""
        high = self.bands.get(names.HIGH_BAND)
        if high is not None and high.held is not None:
            return high.take()
        low = self.bands.get(names.LOW_BAND)
        if low is not None and low.held is not None and (
            normal_idle or time.monotonic() - low.held_at >= LOW_AGING_S
        ):
            return low.take()
        return None

    def wake(self) -> None:
        """A slot was freed, or the default band ran dry: held tasks may start."""
        for b in self.bands.values():
            if b.held is not None:  # a band without one is fetching, not waiting to be woken
                b.wake.set()

    async def _run(self, band: Band) -> None:
        w = self.worker
        while not w.stopping:
            if band.held is None:
                msgs = await band.feed.fetch(1, w.fetch_timeout_s)
                if not msgs:
                    continue
                band.held, band.held_at = msgs[0], time.monotonic()
            # An idle worker starts a held task here; a busy one takes it in its main
            # loop (Worker.next_batch) when a slot frees, ahead of default tasks.
            if w.free_slots() > 0 and w.normal_idle:
                msg = band.take()
                if msg is not None:
                    try:
                        await w.handle([msg])
                    except Exception:
                        log.exception("failed to take a %s-priority task; it is redelivered", band.name)
                continue
            band.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(band.wake.wait(), w.fetch_timeout_s)

    async def close(self) -> None:
        """Stop the loops and unbind; held messages are nak'd for prompt redelivery."""
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        for b in self.bands.values():
            msg = b.take()
            if msg is not None:
                await acknowledge(msg, "nak", f"held {b.name}-priority task")
            await b.feed.close()
