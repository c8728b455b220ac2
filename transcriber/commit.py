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

from common import keys
from common.errors import StaleLease
from common.messages import Closed, Final, Partial, Result, Word, pack_result
from common.scripts import (
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

    def __init__(self, redis: aioredis.Redis, sid: str, epoch: int) -> None:
        self.redis = redis
        self.sid = sid
        self.epoch = epoch
        self._publish = redis.register_script(PUBLISH)
        self._commit = redis.register_script(COMMIT)
        self._close = redis.register_script(CLOSE)
        self._progress = redis.register_script(PROGRESS)
        self._renew = redis.register_script(LEASE_RENEW)
        self._release = redis.register_script(LEASE_RELEASE)
        self._silence = redis.register_script(CLIENT_SILENCE)

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
        """A result; for a partial, ``stable`` (its promised words) is kept for a takeover."""
        args: list[Any] = [self.epoch, pack_result(result)]
        if stable is not None and isinstance(result, Partial):
            args.append(pack_stable(result.utterance, stable))
        seq = await self._publish(keys=[keys.meta(self.sid), keys.results(self.sid)],
                                  args=args)
        return self._check(seq)

    async def commit(self, final: Final, commit_sample: int, next_utterance: int,
                     prompt: str, resume_id: str, timing: dict[str, float] | None = None,
                     speakers: bytes | None = None) -> int:
        """A final with its commit point; ``timing`` (wall clock) is kept for benchmarks;
        ``speakers``: the session's speakers after it (``diarize``), kept with it."""
        args: list[Any] = [self.epoch, pack_result(final), commit_sample, next_utterance,
                           prompt, resume_id, final.utterance, msgpack.packb(timing or {})]
        if speakers is not None:
            args.append(speakers)
        seq = await self._commit(keys=[keys.meta(self.sid), keys.results(self.sid)],
                                 args=args)
        return self._check(seq)

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
        seq = int(await self._close(
            keys=[keys.meta(self.sid), keys.results(self.sid), keys.audio(self.sid)],
            args=[self.epoch, pack_result(closed), retention_s, closed.duration, idle_ms,
                  last_read],
        ))
        return seq if seq == CLIENT_BACK else self._check(seq)

    async def client_silence_ms(self) -> int | None:
        """Milliseconds since the client's last heartbeat, on Redis time (None: none)."""
        ms = int(await self._silence(keys=[keys.meta(self.sid)]))
        return None if ms < 0 else ms
