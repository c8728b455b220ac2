"""Every Redis key name, built in one place.

Per-session keys carry the session id in a hash tag (``{sid}``) so one session
lives on one Redis Cluster slot and multi-key Lua scripts stay legal.
"""

from __future__ import annotations

# Work queue: one entry per session; the pending entry in group GROUP is the
# owner's lease. Entries are acknowledged and deleted when a session ends.
# One queue per model name (``work_queue``): the bundled default keeps this key.
SESSIONS = "stt:sessions"
GROUP = "transcribers"
#: The model name whose sessions queue on ``SESSIONS`` (the bundled model, the default
#: everywhere: ``STT_MODEL``).
DEFAULT_MODEL = "tiny.en"

# Worker registry: one hash, a field per worker (its consumer name), the value a JSON record
# of what it serves (model, device, device index, capacity, free slots) and until when (Redis
# time, ms). Written by each worker every ANNOUNCE_INTERVAL_S (one HSET: workers / interval
# writes a second in all), deleted by a worker that stops; read by gateways (one HGETALL a
# second each, and per GET /v1/models); a crashed worker's field is deleted by the first
# reader that finds it expired more than MODEL_GRACE_S ago. No TTL on the key itself.
WORKERS = "stt:workers"

# Listing index: sorted set of session ids scored by creation time (unix seconds).
# Not hash-tagged: one global key. No TTL of its own; a member whose meta key has
# expired is removed when a listing comes across it.
INDEX = "stt:index"


def tenant_index(tenant: str) -> str:
    """A named tenant's own listing index (as ``INDEX``, its sessions only), so a key of a
    small tenant lists without scanning everyone's. The default tenant lists from ``INDEX``
    (filtered), which also holds the sessions made before tenants. Same upkeep as INDEX."""
    return f"stt:index:{tenant}"


def work_queue(model: str) -> str:
    """The work queue (a stream, group ``GROUP``) of sessions asking for ``model``: the
    default model's is ``SESSIONS``, every other name's ``stt:sessions:<name>`` (a name is
    checked by ``common.models.model_name_ok``). Entries are deleted as in ``SESSIONS``; the
    stream itself stays (no TTL: a few bytes per model name ever used)."""
    return SESSIONS if model in ("", DEFAULT_MODEL) else f"{SESSIONS}:{model}"


def audio(sid: str) -> str:
    """Normalised audio frames and control markers (finalize, close). TTL: retention after end."""
    return f"stt:{{{sid}}}:audio"


def results(sid: str) -> str:
    """Partials, finals and the closing message with their seq. TTL: retention after end."""
    return f"stt:{{{sid}}}:results"


def meta(sid: str) -> str:
    """Session hash: format, state, owner epoch, commit point, seq counter. TTL: retention."""
    return f"stt:{{{sid}}}:meta"


def audio_z(sid: str) -> str:
    """A closed session's audio, compacted (hash: codec, samples, markers, data, raw_bytes;
    ``common/compaction.py``): it replaces ``audio`` once the session is closed. TTL: the
    record's."""
    return f"stt:{{{sid}}}:audio.z"


def session_keys(sid: str) -> tuple[str, str, str, str]:
    """Every key one session has (its hash slot's: ``{sid}``); deletion removes them all."""
    return audio(sid), results(sid), meta(sid), audio_z(sid)


def token_nonce(nonce: str) -> str:
    """A session token's nonce, set (NX) when the token opens its session, so it opens one.

    TTL: until the token can no longer be used at all (its expiry plus its session length).
    """
    return f"stt:token:{nonce}"


def connections(kind: str, who: str) -> str:
    """Sorted set of one client address's, one API key's or one tenant's open sessions
    (``kind`` ip|key|tenant).

    Members are session ids (a replay socket's: a connection id) scored by a lease expiry
    (unix seconds) that their gateway renews. A session's member stays until its audio
    stream is closed (its close marker appended), the resume grace of a dropped socket
    included; a resumed session is the same member, counted once. Members of a gateway that
    died drop out when their lease expires. The key's TTL is renewed with them.
    """
    return f"stt:conns:{kind}:{who}"


# API keys kept in Redis (``common/tenants.py``, managed with ``python -m common.tenants``):
# two hashes on one slot. HASHES: the key's SHA-256 (hex) -> its record (JSON: name, tenant,
# scopes, created); KEY_NAMES: name -> that SHA-256. No TTL: a key lives until revoked.
API_KEY_HASHES = "stt:{apikeys}:hashes"
API_KEY_NAMES = "stt:{apikeys}:names"

# The audit trail: a stream of administrative actions (key created, revoked, rotated; session
# deleted, exported, replayed; quota set), trimmed by age (MINID) as it is written.
AUDIT = "stt:audit"


def tenant_quota(tenant: str) -> str:
    """A tenant's own quotas (hash: max_sessions, audio_hours_per_day), overriding the
    settings' defaults; set with ``python -m common.tenants quota``. No TTL."""
    return f"stt:tenant:{tenant}"


def audio_allowance(tenant: str, day: str) -> str:
    """Audio samples a tenant's sessions have taken of their daily quota on ``day``
    (YYYY-MM-DD, UTC) as grants of ``quota_grant_s`` (unused grants given back). TTL: 2 days."""
    return f"stt:quota:{{{tenant}}}:{day}"


def usage(tenant: str, day: str) -> str:
    """A tenant's usage on ``day`` (hash: ``received:<model>`` and ``transcribed:<model>``,
    audio samples at 16 kHz). Written only by the USAGE_ADD script, by sample positions:
    exact across retries and failovers. TTL: ``usage_retention_days``."""
    return f"stt:usage:{{{tenant}}}:{day}"


def usage_positions(tenant: str, day: str) -> str:
    """The position (samples) up to which each session's audio is counted in ``usage``, by
    field ``<sid>:received`` / ``<sid>:transcribed``, one hash per day (a session is
    looked up in today's and yesterday's). TTL: 2 days."""
    return f"stt:usage:{{{tenant}}}:pos:{day}"

# Every tenant that has had a key in Redis or a session (set of names; no TTL): what an
# admin's GET /v1/usage covers.
TENANTS = "stt:tenants"
