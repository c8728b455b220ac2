"""Session streams: reading one (``read_stream``, ``follow_results``) and appending audio
(``AudioAppender``), and the work queue's backlog.

``read_stream`` is the one blocking reader of a stream: the client's own socket and
replays follow results with it (``follow_results``), the viewer hub too.

Appending audio is fenced by the attach generation and idempotent by seq; it is used by
the gateway (client audio) and by replays. A write whose reply was lost (Redis
restarting after it ran the script) is retried by the caller; the ``audio_seq`` high-water
mark in meta makes the retry a no-op instead of a duplicated frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from common import keys
from common.backoff import REDIS_DOWN, Backoff, reraise_cancel
from common.messages import AudioEntry, Closed, Result, pack_audio_entry, unpack_result
from common.redis_client import is_cluster
from common.replication import add_wait, check_acks, node_name, replica_counts
from common.scripts import APPEND_AUDIO, APPEND_CLOSED, APPEND_GONE

log = logging.getLogger(__name__)

#: One stream entry as redis-py returns it: (entry id, fields).
Entry = tuple[bytes, dict[bytes, bytes]]

#: The append script's answer for a session that has ended.
CLOSED = APPEND_CLOSED
#: The append script's answer for a session whose record is gone (deleted or expired).
GONE = APPEND_GONE

#: One session's append: (sid, attach generation, entries in seq order).
Append = tuple[str, int, Sequence[AudioEntry]]


class AudioAppender:
    """Appends audio entries; the appends of different sessions share Redis round trips.

    Every append made while the event loop runs one turn goes out as one pipeline of
    script calls (at most ``max_batch`` per pipeline; 1 sends each on its own). Each script
    call stays atomic and keeps its own fencing and idempotence; a failed round trip
    fails every append in it, and each caller retries its own (the seq makes that safe).
    A profile of the gateway at 300 sockets had 55 % of its CPU in redis-py's per-command
    path; in a pipeline that cost is paid once per turn, and the pipeline itself is packed
    by hiredis and written straight to a pooled connection (``_run``).
    """

    def __init__(self, redis: aioredis.Redis, max_batch: int = 256,
                 timeout_s: float | None = None, replica_acks: int = 0,
                 ack_timeout_ms: int = 1000) -> None:
        """``timeout_s``: a bound on each round trip, for a client without read timeouts;
        ``replica_acks``: a round trip succeeds only once that many replicas hold its
        appends (``WAIT`` after them on the same connection; common/replication.py)."""
        self._redis = redis
        self.timeout_s = timeout_s
        self.replica_acks = replica_acks
        self.ack_timeout_ms = ack_timeout_ms
        self._script = redis.register_script(APPEND_AUDIO)
        self.max_batch = max(1, max_batch)
        self._waiting: list[tuple[Append, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0  # pipelines sent (with max_batch 1: script calls)

    async def append(self, sid: str, generation: int, entries: Sequence[AudioEntry]) -> bool:
        """Append entries (strictly increasing ``seq``) in order; entries at or below the
        stream's last seq are skipped. False when another connection took the session or
        the session has ended."""
        if self.max_batch == 1:
            self.round_trips += 1
            n = await self._script(keys=_script_keys(sid), args=_script_args(generation, entries))
        else:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append(((sid, generation, entries), fut))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
            n = await fut
        return int(n) >= 0

    async def append_many(self, appends: Sequence[Append]) -> list[Any]:
        """One pipeline of appends, each (sid, generation, entries), for a caller that batches
        itself (the gateway's ``AudioFlusher``). Each reply is the number of entries added, -1
        when another connection took that session, ``CLOSED`` when it has ended, or the
        exception for that append; a
        failed round trip raises."""
        self.round_trips += 1
        replies = await self._run(appends)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (a restart): load it, run the batch again (an
            # append that did run is a no-op the second time: seq)
            await self._redis.script_load(APPEND_AUDIO)
            replies = await self._run(appends)
        return replies

    async def _run(self, appends: Sequence[Append]) -> list[Any]:
        """The script calls, packed by hiredis, written at once on one pooled connection;
        then their replies, in order. redis-py's pipeline cost 36 us of CPU per call (its
        Python packing and parsing, retries and bookkeeping: a third of the gateway's
        time); this costs 17 (a round of 50 calls, measured). Not its script-in-pipeline
        support either: a SCRIPT EXISTS round trip per pipeline (and that command in the
        ACL). A failed round trip raises; the caller sends the round again (the seq makes
        that safe)."""
        if is_cluster(self._redis):
            return await self._run_cluster(appends)
        sha = self._script.sha
        commands = [hiredis.pack_command((b"EVALSHA", sha, 2, *_script_keys(sid),
                                          *_script_args(generation, entries)))
                    for sid, generation, entries in appends]
        counts = replica_counts(self._redis)
        if self.replica_acks:
            await counts.learn(self._redis)
            wait = (b"WAIT", counts.wanted("", self.replica_acks), self.ack_timeout_ms)
            commands.append(hiredis.pack_command(wait))  # type: ignore[arg-type]  # stub: 1-tuple
            commands.append(hiredis.pack_command((b"ROLE",)))
        pool = self._redis.connection_pool
        conn = await pool.get_connection()
        try:
            async with asyncio.timeout(self._round_trip_s()):
                await conn.send_packed_command(b"".join(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:  # this call's error: the others stand
                        replies.append(exc)
            if self.replica_acks:
                role = replies.pop()
                check_acks(replies.pop(), role, self.replica_acks, "audio appends", counts)
            return replies
        except BaseException:
            # replies may still be on their way: this connection is out of step
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _run_cluster(self, appends: Sequence[Append]) -> list[Any]:
        """On a cluster: one redis-py pipeline, which splits the calls by the node that
        holds each session's slot and follows MOVED/ASK; each call's error is its own."""
        pipe = self._redis.pipeline(transaction=False)
        for sid, generation, entries in appends:
            # through execute_command: redis-py's cluster pipeline refuses .evalsha(), but
            # routes the command by its keys (one session's slot) like any other
            pipe.execute_command("EVALSHA", self._script.sha, 2, *_script_keys(sid),
                                 *_script_args(generation, entries))
        waits = 0
        if self.replica_acks:
            # one WAIT per node, after that node's appends (a pipeline sends each node's
            # commands in order on one connection)
            by_node: dict[str, str] = {}
            for sid, _generation, _entries in appends:
                by_node.setdefault(await node_name(self._redis, keys.meta(sid)), keys.meta(sid))
            for key in by_node.values():
                await add_wait(pipe, self._redis, key, self.replica_acks, self.ack_timeout_ms)
            waits = 2 * len(by_node)  # WAIT and ROLE
        async with asyncio.timeout(self._round_trip_s()):
            replies = list(await pipe.execute(raise_on_error=False))
        tail = replies[len(replies) - waits:]
        counts = replica_counts(self._redis)
        for node, waited, role in zip(by_node if waits else (), tail[::2], tail[1::2],
                                      strict=True):
            check_acks(waited, role, self.replica_acks, "audio appends", counts, node)
        return replies[:len(replies) - waits]

    def _round_trip_s(self) -> float | None:
        """The bound on one round trip: with acknowledgements, WAIT's own time on top."""
        if self.timeout_s is None:
            return None
        return self.timeout_s + (self.ack_timeout_ms / 1000.0 if self.replica_acks else 0.0)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the other sessions' appends of this loop turn join in
        while self._waiting:
            batch = self._waiting[:self.max_batch]
            del self._waiting[:self.max_batch]
            try:
                replies = await self.append_many([append for append, _ in batch])
            except Exception as exc:  # the round trip failed: every caller sees it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            except BaseException:  # cancelled: nothing in this batch is known to be stored
                for _, fut in batch + self._waiting:
                    if not fut.done():
                        fut.cancel()
                self._waiting.clear()
                raise
            for (_, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue  # its caller went away (session ended); the append still ran
                if isinstance(reply, BaseException):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)


def _script_keys(sid: str) -> list[str]:
    return [keys.meta(sid), keys.audio(sid)]


def _script_args(generation: int, entries: Sequence[AudioEntry]) -> list[int | bytes]:
    args: list[int | bytes] = [generation]
    for entry in entries:
        args += [entry.seq, pack_audio_entry(entry)["m"]]
    return args


async def read_stream(redis: aioredis.Redis, key: str, cursor: str = "0-0", *,
                      block_ms: int = 1000, batch: int = 100, what: str = "stream",
                      on_error: Callable[[BaseException], None] | None = None,
                      stopped: Callable[[], bool] | None = None,
                      ) -> AsyncIterator[list[Entry]]:
    """Read ``key`` after ``cursor`` with blocking XREAD, forever: yields each batch (an
    empty one when ``block_ms`` passed with nothing new). Redis outages are waited out
    (``common.backoff``; ``on_error`` sees each failure); nothing is skipped. ``redis``: a
    client made with ``blocking=True`` (its socket timeout is above the block time) and
    ``retries=False``. The worker reads a session's audio with it, the gateway the results
    for the client's socket and the viewer hub, replays their results. ``stopped``: the
    reading ends once it says so (asked before each read): an owner shutting down does not
    rely on a cancellation reaching a task inside redis-py, where one can be lost."""
    backoff = Backoff()
    while stopped is None or not stopped():
        try:
            resp = await redis.xread({key: cursor}, count=batch, block=block_ms)
        except REDIS_DOWN as exc:
            reraise_cancel()
            if on_error is not None:
                on_error(exc)
            log.warning("%s: read failed: %s", what, exc)
            await backoff.wait()
            continue
        backoff.reset()
        entries: list[Entry] = []
        for _stream, got in resp or ():
            entries.extend(got)
        if entries:
            cursor = entries[-1][0].decode()
        yield entries


async def follow_results(redis: aioredis.Redis, sid: str, after: str = "0-0",
                         block_ms: int = 1000, batch: int = 100,
                         ) -> AsyncIterator[tuple[str, Result]]:
    """One session's results after entry ``after``, in order: (entry id, result), ending
    with its ``closed`` message."""
    async for entries in read_stream(redis, keys.results(sid), after, block_ms=block_ms,
                                     batch=batch, what=f"session {sid}: results"):
        for entry_id, fields in entries:
            result = unpack_result(fields)
            yield entry_id.decode(), result
            if isinstance(result, Closed):
                return
