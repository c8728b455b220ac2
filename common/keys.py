"""Every Redis key name, built in one place.

Per-session keys carry the session id in a hash tag (``{sid}``) so one session
lives on one Redis Cluster slot and multi-key Lua scripts stay legal.
"""

from __future__ import annotations

# Work queue: one entry per session; the pending entry in group GROUP is the
# owner's lease. Entries are acknowledged and deleted when a session ends.
SESSIONS = "stt:sessions"
GROUP = "transcribers"

# Listing index: sorted set of session ids scored by creation time (unix seconds).
# Not hash-tagged: one global key. No TTL of its own; a member whose meta key has
# expired is removed when a listing comes across it.
INDEX = "stt:index"


def audio(sid: str) -> str:
    """Normalised audio frames and control markers (finalize, close). TTL: retention after end."""
    return f"stt:{{{sid}}}:audio"


def results(sid: str) -> str:
    """Partials, finals and the closing message with their seq. TTL: retention after end."""
    return f"stt:{{{sid}}}:results"


def meta(sid: str) -> str:
    """Session hash: format, state, owner epoch, commit point, seq counter. TTL: retention."""
    return f"stt:{{{sid}}}:meta"


def session_keys(sid: str) -> tuple[str, str, str]:
    """Every key one session has (its hash slot's: ``{sid}``); deletion removes them all."""
    return audio(sid), results(sid), meta(sid)


def token_nonce(nonce: str) -> str:
    """A session token's nonce, set (NX) when the token opens its session, so it opens one.

    TTL: until the token can no longer be used at all (its expiry plus its session length).
    """
    return f"stt:token:{nonce}"


def connections(kind: str, who: str) -> str:
    """Sorted set of one client address's or one API key's open sessions (``kind`` ip|key).

    Members are session ids (a replay socket's: a connection id) scored by a lease expiry
    (unix seconds) that their gateway renews. A session's member stays until its audio
    stream is closed (its close marker appended), the resume grace of a dropped socket
    included; a resumed session is the same member, counted once. Members of a gateway that
    died drop out when their lease expires. The key's TTL is renewed with them.
    """
    return f"stt:conns:{kind}:{who}"
