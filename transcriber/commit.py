"""Fenced writes: every result goes out only while the writer's epoch is the session's epoch.

The scripts (``common/scripts.py``, with their KEYS/ARGV contracts) touch only one
session's hash-tagged keys, so they are legal on Redis Cluster. ``seq`` is assigned in
them, atomically, so it is strictly increasing per session whichever worker writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from common import keys
from common.errors import StaleLease
from common.messages import Closed, Final, Partial, Result, Word, pack_result
from common.replication import run_acked
from common.scripts import (
    ADVANCE_CHANNEL,
    CLIENT_SILENCE,
    CLOSE,
    CLOSE_CLIENT_BACK,
    COMMIT,
    LEASE_ACQUIRE,
    LEASE_DUPLICATE,
    LEASE_GONE,
    LEASE_OTHER_MODEL,
    LEASE_RELEASE,
    LEASE_RENEW,
    PROGRESS,
    PUBLISH,
)

#: SessionWriter.close's answer when an idle close finds the client back.
CLIENT_BACK = CLOSE_CLIENT_BACK
#: SessionWriter.acquire's answer for an entry that duplicates a live lease.
DUPLICATE = LEASE_DUPLICATE
#: SessionWriter.acquire's answer for a session that asked for another model.
OTHER_MODEL = LEASE_OTHER_MODEL


def pack_stable(utterance: int, words: Sequence[Word]) -> bytes:
    return msgpack.packb({"u": utterance,
                          "w": [(w.word, w.start, w.end, w.probability) for w in words]})


def unpack_stable(raw: bytes | None, utterance: int) -> list[Word]:
    """The promised words kept for ``utterance`` (none when they belong to another one)."""
    if not raw:
        return []
    obj = msgpack.unpackb(raw)
    if obj.get("u") != utterance:
        return []
    return [Word(str(w), float(s), float(e), float(p)) for w, s, e, p in obj["w"]]


class SessionWriter:
    """All writes one worker makes to one session, fenced by the epoch it acquired."""

    def __init__(self, redis: aioredis.Redis, sid: str, epoch: int, replica_acks: int = 0,
                 ack_timeout_ms: int = 1000) -> None:
        """``replica_acks``: replicas that must hold a final or the close before it counts as
        written (``REDIS_REPLICA_ACKS``, common/replication.py)."""
        self.redis = redis
        self.sid = sid
        self.epoch = epoch
        self.replica_acks = replica_acks
        self.ack_timeout_ms = ack_timeout_ms
        self._publish = redis.register_script(PUBLISH)
        self._commit = redis.register_script(COMMIT)
        self._close = redis.register_script(CLOSE)
        self._progress = redis.register_script(PROGRESS)
        self._renew = redis.register_script(LEASE_RENEW)
        self._release = redis.register_script(LEASE_RELEASE)
        self._silence = redis.register_script(CLIENT_SILENCE)
        self._advance = redis.register_script(ADVANCE_CHANNEL)

    @staticmethod
    async def acquire(redis: aioredis.Redis, sid: str, owner: str, entry_id: bytes,
                      lease_ms: int, model: str | None = None) -> int | None:
        """The new epoch; None if the session is gone; ``DUPLICATE`` when another entry
        holds a live lease on it; with ``model`` (the one this worker serves, then written
        in the record), ``OTHER_MODEL`` when the session asked for another one."""
        args: list[str | bytes | int] = [owner, entry_id, lease_ms]
        if model is not None:
            args.append(model)
        epoch = int(await redis.register_script(LEASE_ACQUIRE)(
            keys=[keys.meta(sid)], args=args))
        return None if epoch == LEASE_GONE else epoch

    def _check(self, seq: int) -> int:
        if int(seq) < 0:
            raise StaleLease(f"session {self.sid}: epoch {self.epoch} is no longer the owner")
        return int(seq)

    async def publish(self, result: Result, stable: Sequence[Word] | None = None) -> int:
        """A result; for a partial, ``stable`` (its promised words) is kept for a takeover
        (per channel on a multichannel session)."""
        args: list[Any] = [self.epoch, pack_result(result)]
        if stable is not None and isinstance(result, Partial):
            args.append(pack_stable(result.utterance, stable))
            if result.channel is not None:
                args.append(result.channel)
        seq = await self._publish(keys=[keys.meta(self.sid), keys.results(self.sid)],
                                  args=args)
        return self._check(seq)

    async def commit(self, final: Final, commit_sample: int, next_utterance: int,
                     prompt: str, resume_id: str, timing: dict[str, float] | None = None,
                     session_commit: int | None = None,
                     speakers: bytes | None = None) -> int:
        """A final with its commit point; ``timing`` (wall clock) is kept for benchmarks.
        A final of a multichannel session's channel (``final.channel``) commits that
        channel's point, and ``session_commit``, where all its channels have committed;
        ``speakers``: the session's speakers after it (``diarize``), kept with it."""
        args: list[Any] = [self.epoch, pack_result(final), commit_sample, next_utterance,
                           prompt, resume_id, final.utterance, msgpack.packb(timing or {})]
        if final.channel is not None or speakers is not None:
            if final.channel is not None:
                args += [final.channel, commit_sample if session_commit is None
                         else session_commit]
            else:
                args += ["", ""]
            args.append(speakers if speakers is not None else "")
        seq = await self._durable(self._commit, [keys.meta(self.sid), keys.results(self.sid)],
                                  args, "commit")
        return self._check(seq)

    async def _durable(self, script: AsyncScript, keys_: list[str], args: list[Any],
                       what: str) -> Any:
        """A write that must outlive a failover: with ``replica_acks``, done only once that
        many replicas hold it (``NotReplicated`` otherwise: the caller sends it again, and
        the script makes that safe)."""
        if not self.replica_acks:
            return await script(keys=keys_, args=args)
        return await run_acked(self.redis, script, keys_, args, self.replica_acks,
                               self.ack_timeout_ms, f"session {self.sid}: {what}")

    async def advance(self, channel: int, commit_sample: int, resume_id: str,
                      session_commit: int) -> None:
        """A silent channel's commit point moved on (no final: nothing was said)."""
        self._check(await self._advance(keys=[keys.meta(self.sid)], args=[
            self.epoch, channel, commit_sample, resume_id, session_commit]))

    async def progress(self, processed_sample: int) -> None:
        self._check(await self._progress(keys=[keys.meta(self.sid)],
                                         args=[self.epoch, processed_sample]))

    async def renew(self) -> bool:
        """Refresh the lease (Redis time); False once another worker took the session."""
        return bool(int(await self._renew(keys=[keys.meta(self.sid)], args=[self.epoch])))

    async def release(self) -> bool:
        """Give the lease up for a hand-back; False once another worker took the session."""
        return bool(int(await self._release(keys=[keys.meta(self.sid)], args=[self.epoch])))

    async def close(self, closed: Closed, retention_s: int, idle_ms: int = 0,
                    last_read: str = "") -> int:
        """The closing message; with ``idle_ms`` an idle close, ``CLIENT_BACK`` when the
        client's heartbeat or new audio shows it is not idle after all."""
        seq = int(await self._durable(
            self._close, [keys.meta(self.sid), keys.results(self.sid), keys.audio(self.sid)],
            [self.epoch, pack_result(closed), retention_s, closed.duration, idle_ms,
             last_read], "close"))
        return seq if seq == CLIENT_BACK else self._check(seq)

    async def client_silence_ms(self) -> int | None:
        """Milliseconds since the client's last heartbeat, on Redis time (None: none)."""
        ms = int(await self._silence(keys=[keys.meta(self.sid)]))
        return None if ms < 0 else ms
