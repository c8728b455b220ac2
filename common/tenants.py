"""Tenants: API keys kept in Redis, tenant quotas, usage by tenant, model and day, and the
audit trail of administrative actions (docs/security.md).

* **Keys in Redis** (``KeyStore``): ``python -m common.tenants create|list|revoke|rotate``
  writes them; a gateway or fanout looks a presented key up by its SHA-256 (only hashes are
  stored), so a revoked key is refused on its next request. Keys in ``API_KEYS`` still work.
* **Quotas**: concurrent sessions per tenant are a cap set like the per-key one
  (``common/access.py``, the CAP_ACQUIRE script); audio per day is taken in grants of
  ``quota_grant_s`` with the QUOTA_TAKE script (``AudioQuota``), atomically across gateways.
* **Usage** (``Usage``): the USAGE_ADD script counts a session's audio by sample position
  (received: the gateway; transcribed: the worker), so a report repeated after a retry, a
  resume or a worker failover adds nothing.
* **Audit** (``audit``): one stream, trimmed by age (``MINID``) as it is written.

Every key here is a global one or one tenant's (hash tag ``{tenant}``), never a session's:
no script touches two slots (Redis Cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.auth import (
    ADMIN,
    DEFAULT_TENANT,
    MAX_CREDENTIAL_CHARS,
    KeyRecord,
    hash_key,
    new_key,
    parse_scopes,
    tenant_ok,
)
from common.redis_client import make_redis
from common.settings import GatewaySettings, from_sources

DAY_S = 86400

# KEYS: hashes, names. ARGV: name, digest, record. 0 when the name is taken.
KEY_CREATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""

# KEYS: hashes, names. ARGV: name. The revoked key's record, or false (no such name).
KEY_REVOKE = """
local digest = redis.call('HGET', KEYS[2], ARGV[1])
if not digest then return false end
local record = redis.call('HGET', KEYS[1], digest)
redis.call('HDEL', KEYS[1], digest)
redis.call('HDEL', KEYS[2], ARGV[1])
return record or '{}'
"""

# KEYS: hashes, names. ARGV: name, new digest. The key's record (now under the new digest;
# the old key is refused from now on), or false.
KEY_ROTATE = """
local digest = redis.call('HGET', KEYS[2], ARGV[1])
if not digest then return false end
local record = redis.call('HGET', KEYS[1], digest)
redis.call('HDEL', KEYS[1], digest)
redis.call('HSET', KEYS[1], ARGV[2], record)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return record
"""

# KEYS: the tenant's allowance counter for the day. ARGV: samples wanted, the day's limit,
# TTL. Grants what is left, up to the samples wanted (0: the quota is spent).
QUOTA_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local left = tonumber(ARGV[2]) - used
if left <= 0 then return 0 end
local grant = math.min(tonumber(ARGV[1]), left)
redis.call('INCRBY', KEYS[1], grant)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return grant
"""

# KEYS: usage(tenant, today), positions of yesterday, today, tomorrow (the tenant's slot).
# ARGV: sid, kind (received|transcribed), model, position (samples), usage TTL, positions
# TTL. Adds what lies past the position already counted for this session and kind (looked
# up in the three days' positions: a session spans midnight; machines' clocks disagree a
# little); returns the samples added (0 for a position already counted).
USAGE_ADD = """
local field = ARGV[1] .. ':' .. ARGV[2]
local done = 0
for i = 2, 4 do
  local v = tonumber(redis.call('HGET', KEYS[i], field) or '0')
  if v > done then done = v end
end
local pos = tonumber(ARGV[4])
if pos <= done then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':' .. ARGV[3], pos - done)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[3], field, pos)
redis.call('EXPIRE', KEYS[3], ARGV[6])
return pos - done
"""

#: Kinds of usage.
RECEIVED, TRANSCRIBED = "received", "transcribed"


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def seconds_to_midnight(t: float) -> float:
    return DAY_S - (t % DAY_S)


# --------------------------------------------------------------------------- keys in Redis


def _record(raw: bytes | str) -> KeyRecord:
    obj = json.loads(raw)
    return KeyRecord(str(obj["name"]), str(obj.get("tenant") or DEFAULT_TENANT),
                     tuple(obj.get("scopes") or ()))


class KeyStore:
    """API keys kept hashed in Redis (two hashes on one slot: ``keys.API_KEY_HASHES``,
    ``keys.API_KEY_NAMES``)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._keys = [keys.API_KEY_HASHES, keys.API_KEY_NAMES]
        self._create = redis.register_script(KEY_CREATE)
        self._revoke = redis.register_script(KEY_REVOKE)
        self._rotate = redis.register_script(KEY_ROTATE)

    async def lookup(self, presented: str) -> KeyRecord | None:
        """The key's record, or None: one HGET by its SHA-256 (a 256-bit key's hash; the
        lookup's timing says nothing about other keys)."""
        if not presented or len(presented) > MAX_CREDENTIAL_CHARS:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
        raw = await self.redis.hget(keys.API_KEY_HASHES, digest)
        return _record(raw) if raw else None

    async def create(self, name: str, tenant: str = DEFAULT_TENANT,
                     scopes: Sequence[str] = ()) -> str:
        """A new key (returned once: only its hash is stored). ValueError for a bad or
        taken name."""
        if not tenant_ok(name) or not tenant_ok(tenant):
            raise ValueError("key and tenant names are 1-64 letters, digits, '_', '.', '-'")
        key = new_key()
        record = json.dumps({"name": name, "tenant": tenant, "scopes": sorted(scopes),
                             "created": round(time.time(), 3)})
        digest = hash_key(key).removeprefix("sha256:")
        if not int(await self._create(keys=self._keys, args=[name, digest, record])):
            raise ValueError(f"a key named {name!r} exists already")
        await self.redis.sadd(keys.TENANTS, tenant)
        return key

    async def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        out = []
        for _digest, raw in (await self.redis.hgetall(keys.API_KEY_HASHES)).items():
            obj = json.loads(raw)
            if tenant is None or obj.get("tenant") == tenant:
                out.append(obj)
        return sorted(out, key=lambda o: (o.get("tenant", ""), o.get("name", "")))

    async def revoke(self, name: str) -> KeyRecord | None:
        raw = await self._revoke(keys=self._keys, args=[name])
        return _record(raw) if raw else None

    async def rotate(self, name: str) -> tuple[str, KeyRecord] | None:
        """A new key for ``name`` (same tenant and scopes); the old one is refused at once."""
        key = new_key()
        raw = await self._rotate(keys=self._keys,
                                 args=[name, hash_key(key).removeprefix("sha256:")])
        return (key, _record(raw)) if raw else None


# --------------------------------------------------------------------------- quotas


@dataclasses.dataclass(frozen=True)
class Quotas:
    """One tenant's limits (0: none)."""

    max_sessions: int = 0
    audio_hours_per_day: float = 0.0


async def tenant_quotas(redis: aioredis.Redis, tenant: str, defaults: Quotas) -> Quotas:
    """The tenant's own quotas where it has them, the defaults otherwise."""
    sessions, hours = await redis.hmget(keys.tenant_quota(tenant),
                                        ["max_sessions", "audio_hours_per_day"])
    return Quotas(int(sessions) if sessions is not None else defaults.max_sessions,
                  float(hours) if hours is not None else defaults.audio_hours_per_day)


class AudioQuota:
    """One session's share of its tenant's audio per day, taken in grants (QUOTA_TAKE):
    ``take`` says whether the next samples fit; ``give_back`` returns what is unused."""

    def __init__(self, redis: aioredis.Redis, tenant: str, limit_samples: int,
                 grant_samples: int) -> None:
        self.redis = redis
        self.tenant = tenant
        self.limit = limit_samples
        self.grant = max(1, grant_samples)
        self.held = 0  # samples granted and not yet used
        self.day = ""
        self._take = redis.register_script(QUOTA_TAKE)

    async def take(self, samples: int, now: float | None = None) -> bool:
        """Take ``samples`` of the day's quota; False when they do not fit (what part of them
        it could take stays held: ``give_back`` returns it)."""
        if self.limit <= 0:
            return True
        now = time.time() if now is None else now
        day = day_of(now)
        if day != self.day:  # a new day: what was held counted against the old one
            self.day, self.held = day, 0
        while self.held < samples:
            got = int(await self._take(keys=[keys.audio_allowance(self.tenant, day)], args=[
                max(self.grant, samples - self.held), self.limit, 2 * DAY_S]))
            if got <= 0:
                return False
            self.held += got
        self.held -= samples
        return True

    async def give_back(self) -> None:
        held, self.held = self.held, 0
        if held > 0 and self.day == day_of(time.time()):
            await self.redis.decrby(keys.audio_allowance(self.tenant, self.day), held)


async def audio_quota_left(redis: aioredis.Redis, tenant: str, limit_samples: int) -> bool:
    """Whether the tenant has audio left today (a new session asks before it opens)."""
    if limit_samples <= 0:
        return True
    used = await redis.get(keys.audio_allowance(tenant, day_of(time.time())))
    return int(used or 0) < limit_samples


# --------------------------------------------------------------------------- usage


class Usage:
    """Reports of sessions' audio by sample position, counted once each (USAGE_ADD)."""

    def __init__(self, redis: aioredis.Redis, retention_days: int) -> None:
        self.redis = redis
        self.retention_s = max(1, retention_days) * DAY_S
        self._add = redis.register_script(USAGE_ADD)

    async def report(self, tenant: str, sid: str, kind: str, model: str, position: int,
                     now: float | None = None) -> int:
        """Count the session's audio up to ``position`` (samples); returns the samples added
        now (0 when that position was counted already)."""
        if position <= 0:
            return 0
        now = time.time() if now is None else now
        tenant = tenant or DEFAULT_TENANT
        days = [day_of(now - DAY_S), day_of(now), day_of(now + DAY_S)]
        return int(await self._add(
            keys=[keys.usage(tenant, days[1])] + [keys.usage_positions(tenant, d) for d in days],
            args=[sid, kind, model or keys.DEFAULT_MODEL, int(position), self.retention_s,
                  3 * DAY_S]))


async def read_usage(redis: aioredis.Redis, tenants: Sequence[str], days: Sequence[str],
                     rate: int) -> list[dict[str, Any]]:
    """Rows of ``{tenant, day, model, received_s, transcribed_s}`` (seconds at ``rate``)."""
    pipe = redis.pipeline(transaction=False)
    pairs = [(t, d) for t in tenants for d in days]
    for tenant, day in pairs:
        pipe.hgetall(keys.usage(tenant, day))
    rows = []
    for (tenant, day), raw in zip(pairs, await pipe.execute(), strict=True):
        models: dict[str, dict[str, float]] = {}
        for field, value in raw.items():
            kind, _, model = field.decode().partition(":")
            if kind in (RECEIVED, TRANSCRIBED):
                models.setdefault(model, {RECEIVED: 0, TRANSCRIBED: 0})[kind] = int(value)
        for model, counts in sorted(models.items()):
            rows.append({"tenant": tenant, "day": day, "model": model,
                         "received_s": round(counts[RECEIVED] / rate, 3),
                         "transcribed_s": round(counts[TRANSCRIBED] / rate, 3),
                         "received_samples": counts[RECEIVED],
                         "transcribed_samples": counts[TRANSCRIBED]})
    return rows


def day_range(start: str, end: str, most: int) -> list[str]:
    """Days from ``start`` to ``end`` (YYYY-MM-DD, inclusive); ValueError past ``most``."""
    lo = datetime.date.fromisoformat(start)
    hi = datetime.date.fromisoformat(end)
    if hi < lo or (hi - lo).days >= most:
        raise ValueError(f"from..to must be 1 to {most} days")
    return [(lo + datetime.timedelta(days=i)).isoformat() for i in range((hi - lo).days + 1)]


# --------------------------------------------------------------------------- audit trail


async def audit(redis: aioredis.Redis, retention_s: float, action: str, actor: str,
                actor_tenant: str, tenant: str, target: str, **detail: Any) -> None:
    """One administrative action in the audit stream, trimmed by age as it is written."""
    now = time.time()
    fields = {"at": f"{now:.3f}", "action": action, "actor": actor or "anonymous",
              "actor_tenant": actor_tenant, "tenant": tenant or DEFAULT_TENANT,
              "target": target}
    if detail:
        fields["detail"] = json.dumps(detail, separators=(",", ":"))
    oldest = max(0, math.floor((now - retention_s) * 1000))
    # exact trimming: an audit stream is written a few times a minute, and an approximate
    # MINID trims only whole nodes of 100 entries
    await redis.xadd(keys.AUDIT, fields, minid=oldest, approximate=False)


async def read_audit(redis: aioredis.Redis, after: str, limit: int,
                     tenant: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Entries after the id ``after`` ("0-0": the oldest kept), oldest first; with ``tenant``
    only those about it. Returns them and the id to read on from."""
    page = await redis.xrange(keys.AUDIT, min=f"({after}" if after != "0-0" else "-",
                              count=limit)
    out = []
    last = after
    for entry_id, raw in page:
        last = entry_id.decode()
        entry = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        if tenant is not None and entry.get("tenant") != tenant:
            continue
        entry["id"] = last
        entry["at"] = float(entry.get("at") or 0)
        if "detail" in entry:
            entry["detail"] = json.loads(entry["detail"])
        out.append(entry)
    return out, last


# --------------------------------------------------------------------------- command line


async def _run(args: argparse.Namespace) -> int:
    settings = from_sources(GatewaySettings, {"redis_url": args.redis_url}, os.environ)
    redis = make_redis(settings)
    store = KeyStore(redis)
    actor = f"cli:{os.environ.get('USER', 'operator')}"
    retention = settings.audit_retention_s
    try:
        if args.command == "create":
            key = await store.create(args.name, args.tenant, parse_scopes(args.scopes))
            await audit(redis, retention, "key_created", actor, "", args.tenant, args.name,
                        scopes=args.scopes)
            print(f"key (give it to the client; it is not stored anywhere): {key}")
        elif args.command == "list":
            for obj in await store.list(args.tenant):
                scopes = ",".join(obj.get("scopes") or ()) or "-"
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(obj.get("created", 0)))
                print(f"{obj['tenant']}\t{obj['name']}\t{scopes}\t{created}")
        elif args.command in ("revoke", "rotate"):
            if args.command == "revoke":
                record, key = await store.revoke(args.name), None
            else:
                rotated = await store.rotate(args.name)
                key, record = rotated if rotated is not None else (None, None)
            if record is None:
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
            await audit(redis, retention, f"key_{args.command}d", actor, "", record.tenant,
                        args.name)
            print(f"revoked {args.name} (tenant {record.tenant})" if key is None
                  else f"key (the old one is refused from now on): {key}")
        elif args.command == "quota":
            fields: dict[str, str] = {}
            if args.max_sessions is not None:
                fields["max_sessions"] = str(args.max_sessions)
            if args.audio_hours_per_day is not None:
                fields["audio_hours_per_day"] = str(args.audio_hours_per_day)
            if fields:
                await redis.hset(keys.tenant_quota(args.tenant), mapping=fields)
                await audit(redis, retention, "quota_set", actor, "", args.tenant,
                            args.tenant, **fields)
            quotas = await tenant_quotas(redis, args.tenant, Quotas(
                settings.tenant_max_sessions, settings.tenant_audio_hours_per_day))
            print(f"{args.tenant}: max_sessions={quotas.max_sessions} "
                  f"audio_hours_per_day={quotas.audio_hours_per_day} (0 = no limit)")
    finally:
        await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.tenants",
        description="API keys kept (hashed) in Redis, and tenants' quotas.")
    parser.add_argument("--redis-url", default=None, help="default: env REDIS_URL")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a new API key of a tenant (printed once)")
    create.add_argument("--name", required=True, help="the key's name (logs, per-key caps)")
    create.add_argument("--tenant", default=DEFAULT_TENANT)
    create.add_argument("--scopes", default="", help=f"e.g. {ADMIN}")
    listing = sub.add_parser("list", help="the keys (names, tenants, scopes; never keys)")
    listing.add_argument("--tenant", default=None)
    revoke = sub.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("name")
    rotate = sub.add_parser("rotate", help="a new key for a name; the old one is refused")
    rotate.add_argument("name")
    quota = sub.add_parser("quota", help="show or set a tenant's quotas")
    quota.add_argument("tenant")
    quota.add_argument("--max-sessions", type=int, default=None)
    quota.add_argument("--audio-hours-per-day", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(_run(args)))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
