"""Token streams: an LLM reply's chunks, published as they arrive, replayable from the first.

A worker whose model call streams (``stream: true`` in a YAML LLM worker's config,
the ``heddle-stream`` task header, or ``complete(..., stream=True)`` in a task)
publishes each text chunk the provider sends, at once, on
``heddle.streams.{task_id}`` in the HEDDLE_STREAMS stream (a limits stream bounded
by age and size: :data:`heddle.broker.STREAMS_MAX_AGE_S`,
:data:`~heddle.broker.STREAMS_MAX_BYTES`). Each chunk is stored before the next
is sent, and all of them before the task's result, so:

* a reader (``AsyncResult.stream()`` / ``astream()``) replays the subject from its
  first message through an ordered consumer, whenever it joins;
* it ends once the task's final state is stored and it has read every chunk stored
  before it (a task that streamed nothing ends at once);
* the chunks of one reply, concatenated, are its text.

A reply can be superseded: an attempt retried after it had sent some text, a
repair call, an escalation to the next tier, a task redelivered to another
worker. Each chunk says which reply it belongs to (a random id per task run, and
the reply's number in that run), and the reader marks the first chunk of every
reply after the first with :attr:`StreamChunk.new_reply`: the text since the last
such chunk is the reply being written.

Publishing never fails the task: a chunk that cannot be published stops that
task's stream (logged once), and the result is stored as usual.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from typing import Any

import msgspec

from heddle import names
from heddle.broker import Broker
from heddle.context import task_context
from heddle.pull import SubjectReader

__all__ = ["ChunkWriter", "StreamChunk", "bind_broker", "follow", "task_writer"]

log = logging.getLogger("heddle.chunks")


class Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One published piece of a reply (msgpack on the wire).

    Attributes:
        v: Wire version.
        text: The text the provider sent.
        run: Random id of the task run that wrote it (a redelivered task's run differs).
        reply: The reply's number within the run, from 1.
    """

    v: int = 1
    text: str
    run: str
    reply: int = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Chunk)


class StreamChunk(str):
    """A chunk of streamed text, as ``stream()`` yields it: a ``str`` with where it belongs.

    Attributes:
        reply: Which reply of the stream it belongs to, counted from 1 over the whole stream.
        new_reply: True on the first chunk of every reply after the first: the text
            before it was superseded (a retry, a repair, an escalation, a redelivery).
    """

    reply: int
    new_reply: bool

    def __new__(cls, text: str, reply: int = 1, new_reply: bool = False) -> StreamChunk:
        chunk = super().__new__(cls, text)
        chunk.reply, chunk.new_reply = reply, new_reply
        return chunk


class _Binding:
    """The worker's broker for one task run, and the run's writer once it streams."""

    __slots__ = ("broker", "writer")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.writer: ChunkWriter | None = None


# Set by the worker for each task it runs; model calls made in that task stream with it.
_binding: ContextVar[_Binding | None] = ContextVar("heddle_stream_binding", default=None)


def bind_broker(broker: Broker | None) -> None:
    """Make ``broker`` the one the task run in this context publishes its token chunks with."""
    _binding.set(_Binding(broker) if broker is not None else None)


class ChunkWriter:
    """Publishes one task run's chunks in order; what a backend streams into.

    Args:
        broker: A connected broker.
        task_id: The task whose stream it writes.
    """

    def __init__(self, broker: Broker, task_id: str) -> None:
        self.broker = broker
        self.subject = names.stream_subject(task_id)
        self.run = uuid.uuid4().hex[:12]
        self.reply = 0
        self._written = True  # the first begin() starts reply 1
        self.failed = False

    def begin(self) -> None:
        """A model reply starts: after a reply that sent text, its chunks belong to the next one."""
        if self._written:
            self.reply += 1
            self._written = False

    async def write(self, text: str) -> None:
        """Publish one chunk and wait until the stream holds it (so chunks stay in order)."""
        if not text or self.failed:
            return
        self._written = True
        data = _encoder.encode(Chunk(text=text, run=self.run, reply=max(1, self.reply)))
        try:
            await self.broker.publish(self.subject, data, {})
        except Exception as exc:  # a sync task's own loop, a lost connection: never the task's failure
            self.failed = True
            log.warning("cannot publish the token stream on %s (%s); the task goes on without it",
                        self.subject, exc)


def task_writer() -> ChunkWriter | None:
    """The chunk writer of the task running in this context, or None outside a worker's task."""
    ctx = task_context()
    binding = _binding.get()
    if ctx is None or binding is None:
        return None
    if binding.writer is None:
        binding.writer = ChunkWriter(binding.broker, ctx.id)
    return binding.writer


async def follow(broker: Broker, task_id: str, ended: Awaitable[Any]) -> AsyncIterator[StreamChunk]:
    """Yield task ``task_id``'s chunks from the first, in order, until it has ended.

    Args:
        broker: A connected broker.
        task_id: The task.
        ended: Done when the task's final state is stored (its exception, a timeout, is raised).
    """
    reader = SubjectReader(broker, names.STREAMS_STREAM, names.stream_subject(task_id))
    await reader.open()
    done = asyncio.ensure_future(ended)
    until: int | None = None  # the last sequence to read, once the task has ended
    # The sequence of the last chunk taken from ``get``. Not ``reader.last_seq``: a read still
    # pending here may have taken the next chunk already (while ``stored_until`` was awaited),
    # and ending on that would drop the chunk it holds.
    taken = 0
    last: tuple[str, int] | None = None
    reply = 0
    get: asyncio.Future[bytes] | None = None
    try:
        while until is None or taken < until:
            if get is None:
                get = asyncio.ensure_future(reader.next())
            if until is None:
                await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    done.result()  # a timeout ends the iteration with its error
                    # Every chunk was stored before the result: read up to the newest.
                    until = await reader.stored_until()
                    continue
            data = await get
            taken = reader.last_seq  # one read at a time: this is the chunk just taken
            get = None
            try:
                chunk = _decoder.decode(data)
            except msgspec.DecodeError:
                log.warning("skipping an undecodable chunk on %s", reader.subject)
                continue
            key = (chunk.run, chunk.reply)
            new = last is not None and key != last
            if key != last:
                reply += 1
                last = key
            yield StreamChunk(chunk.text, reply, new)
    finally:
        if get is not None:
            get.cancel()
        if not done.done():
            done.cancel()
        await reader.close()
