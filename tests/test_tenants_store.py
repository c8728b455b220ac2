"""Tenants' Redis pieces (common/tenants.py) against a real redis-server: keys kept hashed
(create, list, revoke, rotate; the CLI), the audio quota's grants taken atomically by many
sessions at once, usage counted once per sample position whatever repeats it, and the audit
trail trimmed by age. The gateway-level matrix is tests/test_tenants.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time

import pytest

from common import keys
from common.auth import DEFAULT_TENANT, KeyRecord
from common.sessions import Sessions, create_session
from common.tenants import (
    DAY_S,
    RECEIVED,
    TRANSCRIBED,
    AudioQuota,
    KeyStore,
    Usage,
    audit,
    day_of,
    read_audit,
    read_usage,
)
from tests.procs import ROOT, RedisServer

pytestmark = pytest.mark.integration


async def test_keys_are_stored_hashed_and_can_be_listed_revoked_and_rotated(
        module_redis: RedisServer) -> None:
    async with module_redis.aclient() as r:
        await r.flushall()
        store = KeyStore(r)
        key = await store.create("web", "acme")
        admin = await store.create("ops", "root", ["admin"])
        assert await store.lookup(key) == KeyRecord("web", "acme", ())
        assert await store.lookup(admin) == KeyRecord("ops", "root", ("admin",))
        assert await store.lookup(key + "x") is None and await store.lookup("") is None
        dump = repr(await r.hgetall(keys.API_KEY_HASHES)) + repr(
            await r.hgetall(keys.API_KEY_NAMES))
        assert key not in dump and admin not in dump  # only hashes
        assert hashlib.sha256(key.encode()).hexdigest() in dump
        with pytest.raises(ValueError, match="exists already"):
            await store.create("web", "beta")
        with pytest.raises(ValueError):
            await store.create("bad name", "acme")
        assert [o["name"] for o in await store.list()] == ["web", "ops"]  # acme < root
        assert [o["name"] for o in await store.list("acme")] == ["web"]
        rotated = await store.rotate("web")
        assert rotated is not None
        new, record = rotated
        assert record == KeyRecord("web", "acme", ())
        assert await store.lookup(key) is None  # the old key is refused at once
        assert await store.lookup(new) == record
        assert await store.revoke("web") == record
        assert await store.lookup(new) is None
        assert await store.revoke("web") is None and await store.rotate("web") is None
        assert await r.sismember(keys.TENANTS, "acme")


def test_the_cli_creates_lists_rotates_and_revokes_keys(module_redis: RedisServer) -> None:
    env = {**os.environ, "REDIS_URL": module_redis.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "common.tenants", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=30)

    made = cli("create", "--name", "cli-key", "--tenant", "gamma", "--scopes", "admin")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().rsplit(" ", 1)[1]
    assert key.startswith("stt_")
    listed = cli("list", "--tenant", "gamma")
    assert "gamma\tcli-key\tadmin\t" in listed.stdout and key not in listed.stdout
    rotated = cli("rotate", "cli-key")
    assert rotated.returncode == 0 and rotated.stdout.strip().rsplit(" ", 1)[1] != key
    assert cli("revoke", "cli-key").returncode == 0
    assert cli("revoke", "cli-key").returncode == 1
    quota = cli("quota", "gamma", "--max-sessions", "3", "--audio-hours-per-day", "1.5")
    assert "max_sessions=3 audio_hours_per_day=1.5" in quota.stdout
    assert module_redis.client().hgetall(keys.tenant_quota("gamma")) == {
        b"max_sessions": b"3", b"audio_hours_per_day": b"1.5"}
    actions = [e[1][b"action"] for e in module_redis.client().xrange(keys.AUDIT)]
    assert actions[-4:] == [b"key_created", b"key_rotated", b"key_revoked", b"quota_set"]


async def test_audio_quota_grants_never_exceed_the_day_across_many_sessions(
        module_redis: RedisServer) -> None:
    """40 sessions take 1-second grants of a 25-second quota at once (as 40 sessions on
    several gateways would): exactly 25 seconds are granted, what is unused comes back."""
    rate = 16000
    async with module_redis.aclient() as r:
        await r.delete(keys.audio_allowance("q", day_of(time.time())))
        quotas = [AudioQuota(r, "q", 25 * rate, rate) for _ in range(40)]

        async def use(quota: AudioQuota) -> int:
            got = 0
            while await quota.take(1600):  # 100 ms frames
                got += 1600
            return got

        used = await asyncio.gather(*(use(q) for q in quotas))
        assert sum(used) == 25 * rate
        assert int(await r.get(keys.audio_allowance("q", day_of(time.time())))) == 25 * rate
        # a session that ends holding part of a grant gives it back
        await r.delete(keys.audio_allowance("q", day_of(time.time())))
        one = AudioQuota(r, "q", 25 * rate, rate)
        assert await one.take(1600)
        assert int(await r.get(keys.audio_allowance("q", day_of(time.time())))) == rate
        await one.give_back()
        assert int(await r.get(keys.audio_allowance("q", day_of(time.time())))) == 1600


async def test_usage_counts_each_sample_position_once(module_redis: RedisServer) -> None:
    """Reports repeated (a retry), out of order (a failed worker's late one), from a second
    reporter (the worker that took over), and across midnight add each sample once."""
    async with module_redis.aclient() as r:
        usage = Usage(r, 400)
        now = 20834 * DAY_S - 30.0  # 30 s before a UTC midnight
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 16000, now) == 16000
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 16000, now) == 0
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 8000, now) == 0
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 24000, now) == 8000
        assert await usage.report("acme", "s1", TRANSCRIBED, "tiny.en", 20000, now) == 20000
        # the transcriber failed over: its successor reports from the commit point on
        assert await usage.report("acme", "s1", TRANSCRIBED, "tiny.en", 12000, now) == 0
        assert await usage.report("acme", "s1", TRANSCRIBED, "tiny.en", 24000, now) == 4000
        # past midnight the same session adds only what is new, to the new day
        later = now + 60
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 40000, later) == 16000
        # a reporter whose clock is still before midnight does not count it again
        assert await usage.report("acme", "s1", RECEIVED, "tiny.en", 40000, now) == 0
        rows = await read_usage(r, ["acme"], [day_of(now), day_of(later)], 16000)
        assert [(x["day"], x["received_samples"], x["transcribed_samples"]) for x in rows] == [
            (day_of(now), 24000, 24000), (day_of(later), 16000, 0)]
        assert rows[0]["received_s"] == 1.5 and rows[0]["model"] == "tiny.en"
        assert 0 < await r.ttl(keys.usage_positions("acme", day_of(now))) <= 3 * DAY_S
        assert await read_usage(r, [DEFAULT_TENANT], [day_of(now)], 16000) == []


async def test_the_audit_trail_is_trimmed_by_age(module_redis: RedisServer) -> None:
    async with module_redis.aclient() as r:
        await r.delete(keys.AUDIT)
        await audit(r, 1.0, "session_deleted", "key:a", "acme", "acme", "s1")
        await audit(r, 1.0, "session_exported", "key:b", "beta", "beta", "s2", format="wav")
        entries, last = await read_audit(r, "0-0", 10)
        assert [(e["action"], e["actor"], e["tenant"]) for e in entries] == [
            ("session_deleted", "key:a", "acme"), ("session_exported", "key:b", "beta")]
        assert entries[1]["detail"] == {"format": "wav"}
        assert abs(entries[0]["at"] - time.time()) < 5
        assert [e["target"] for e in (await read_audit(r, "0-0", 10, "beta"))[0]] == ["s2"]
        assert (await read_audit(r, last, 10))[0] == []
        await asyncio.sleep(1.2)
        await audit(r, 1.0, "key_revoked", "cli:op", "", "acme", "web")
        entries, _ = await read_audit(r, "0-0", 10)
        assert [e["action"] for e in entries] == ["key_revoked"]  # the older two trimmed


async def test_a_small_tenant_lists_its_sessions_without_scanning_everyones(
        module_redis: RedisServer) -> None:
    """One acme session under 1200 newer sessions of the default tenant: acme's first page
    holds it (its own index), though one listing scans at most 1000 index entries; the
    default tenant's listing (the global index, filtered) leaves it out; deletion removes
    it from both indexes."""
    async with module_redis.aclient() as r:
        await r.flushall()
        records = Sessions(r)
        await create_session(r, "a" * 32, {"tenant": "acme", "model": "tiny.en"})
        pipe_size = 100
        for start in range(0, 1200, pipe_size):
            await asyncio.gather(*(create_session(r, f"{i:032x}", {"model": "tiny.en"})
                                   for i in range(start, start + pipe_size)))
        page, _ = await records.list_sessions(10, max_scan=1000, tenant="acme")
        assert [s.session_id for s in page] == ["a" * 32] and page[0].tenant == "acme"
        page, _ = await records.list_sessions(2000, max_scan=5000, tenant=DEFAULT_TENANT)
        assert len(page) == 1200 and {s.tenant for s in page} == {DEFAULT_TENANT}
        page, _ = await records.list_sessions(2000, max_scan=5000)  # an admin: everyone's
        assert len(page) == 1201
        await records.delete("a" * 32)
        assert await r.zcard(keys.tenant_index("acme")) == 0
        assert await r.zscore(keys.INDEX, "a" * 32) is None
