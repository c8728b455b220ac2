"""Checks made on every HTTP request before a WebSocket upgrade: request rates, Origin,
credentials, the client's address, and the per-address and per-key caps on concurrent
sessions.

Used by the gateway and by ``python -m fanout``; each failure is an ``SttError`` whose
``http_status`` becomes the response (401, 403, 429) with a JSON error body.

Request rates are token buckets kept in this process (``common/ratelimit.py``): per client
address, per API key, and per address for failed authentications (brute force). They bound
what one process serves; with N gateways a client gets up to N times the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import time
import uuid
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from common import keys
from common.auth import (
    ANONYMOUS,
    ApiKeys,
    Principal,
    TokenClaims,
    TokenSigner,
    key_principal,
    looks_like_token,
)
from common.errors import OriginNotAllowed, RateLimited, TooManySessions, Unauthorized
from common.ratelimit import BucketMap
from common.redis_client import REDIS_DOWN
from common.settings import AccessSettings

log = logging.getLogger(__name__)

#: Subprotocol a browser offers besides ``bearer.<token>``; the server selects it, so the
#: credential is never echoed back.
SUBPROTOCOL = "stt"
BEARER_PROTOCOL_PREFIX = "bearer."

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Values of a token's nonce key (``keys.token_nonce``): it opened its session, or it was
#: revoked before it could.
TOKEN_USED = b"used"
TOKEN_REVOKED = b"revoked"
#: A nonce key outlives its token's first-use window by this much (clocks that disagree).
NONCE_MARGIN_S = 60

# KEYS: one connections set. ARGV: now, lease expiry, member, cap (0 = none), key TTL.
# Returns 1 when the member was added, 2 when it was already there (a resumed session: its
# lease is refreshed and it does not count twice), 0 when the set is at its cap.
# (ZADD XX INCR 0 is nil for a missing member: the existence test with the gateway's ACL,
# docker/redis-users.acl, which grants zadd but not zscore.)
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'INCR', 0, ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 2
end
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

#: An upgrade answered 101 whose handler has not taken its lease this long after is one
#: whose client vanished before the handler started (websockets then never runs it).
HANDLER_START_S = 5.0
#: An admitted upgrade not answered at all this long after (the handshake timed out).
HANDSHAKE_LIMIT_S = 60.0


def parse_networks(config: str) -> list[IPNetwork]:
    return [ipaddress.ip_network(item.strip(), strict=False)
            for item in config.split(",") if item.strip()]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_address(peer: str, forwarded_for: Sequence[str],
                   trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    address in X-Forwarded-For that is not one (the rightmost untrusted hop; anything
    further left was written by the client and proves nothing)."""
    current = _address(peer)
    if current is None:
        return peer
    hops = [h for line in forwarded_for for h in line.split(",")]
    while hops and any(current in net for net in trusted):
        nxt = _address(hops.pop())
        if nxt is None:
            break  # a malformed hop: stop at the last proxy we trust
        current = nxt
    return str(current)


def address_bucket(address: str) -> str:
    """What a per-address cap counts: the address, or its /64 for IPv6 (one subscriber's
    allocation, which a client can otherwise walk through)."""
    addr = _address(address)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return address


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


@dataclasses.dataclass
class CapHold:
    """One local holder of a cap member: a connection, or a detached session waiting out its
    resume grace. Several holders (on one gateway or on several) may hold the same member,
    a session id: a resumed session is counted once."""

    member: str
    keys: list[str]  # the connections sets it holds the member in
    added: list[str]  # those where this holder added it (not found it already there)


@dataclasses.dataclass
class Admitted:
    """An upgrade that passed ``admit``, waiting for its handler (``take``)."""

    principal: Principal
    lease: str | None
    at: float  # monotonic: when it was admitted, then when its 101 went out
    answered: bool = False


def select_subprotocol(connection: ServerConnection,
                       offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Select ``stt`` when offered (a browser sending ``bearer.<token>`` must offer it:
    browsers fail a handshake whose response selects none of the offered ones). The
    credential-carrying entry is never selected, so never echoed."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


class AccessGuard:
    """Origin allowlist, authentication, and session caps for one server process."""

    def __init__(self, settings: AccessSettings, redis: aioredis.Redis,
                 lease_s: float = 30.0) -> None:
        if settings.auth not in ("required", "off"):
            raise ValueError("AUTH must be 'required' or 'off'")
        self.required = settings.auth == "required"
        self.keys = ApiKeys(settings.api_keys)
        self.tokens = TokenSigner(settings.token_secret)
        self.origins = {normalize_origin(o) for o in settings.allowed_origins.split(",")
                        if o.strip()}
        self.proxies = parse_networks(settings.trusted_proxies)
        self.redis = redis
        self.lease_s = lease_s
        self._acquire = redis.register_script(_ACQUIRE)
        # Cap leases of this process: local handle -> the member it holds and where.
        self._held: dict[str, CapHold] = {}
        # Admitted upgrades waiting for their handler.
        self._conns: dict[object, Admitted] = {}
        self.ip_rate = BucketMap(settings.rate_limit_ip_per_s, settings.rate_limit_ip_burst,
                                 settings.rate_limit_buckets)
        self.key_rate = BucketMap(settings.rate_limit_key_per_s, settings.rate_limit_key_burst,
                                  settings.rate_limit_buckets)
        self.auth_failures = BucketMap(settings.auth_failures_per_min / 60.0,
                                       settings.auth_failure_burst, settings.rate_limit_buckets)

    def describe(self) -> str:
        if not self.required:
            return "AUTHENTICATION IS OFF: anyone who can reach this port may use it"
        if not len(self.keys) and not self.tokens.enabled:
            return ("AUTH=required but no API_KEYS and no TOKEN_SECRET: every /v1 request "
                    "will be refused (python -m common.auth new-key, or AUTH=off locally)")
        return (f"authentication required: {len(self.keys)} API key(s), session tokens "
                f"{'on' if self.tokens.enabled else 'off'}")

    # ------------------------------------------------------------------ request checks

    def client_ip(self, peer: str, headers: Headers) -> str:
        if not self.proxies:
            return peer
        return client_address(peer, headers.get_all("X-Forwarded-For"), self.proxies)

    def request_ip(self, connection: object, request: Request) -> str:
        peer = getattr(connection, "remote_address", None)
        return self.client_ip(str(peer[0]) if peer else "", request.headers)

    def check_rate(self, ip: str, now: float) -> None:
        """RateLimited when this address is locked out by failed authentications or has
        spent its request allowance; otherwise counts the request."""
        bucket = address_bucket(ip)
        wait = self.auth_failures.wait(bucket, now)
        if wait:
            raise RateLimited("too many failed authentications from this address; retry "
                              "later", wait)
        wait = self.ip_rate.take(bucket, now)
        if wait:
            raise RateLimited("too many requests from this address; retry later", wait)

    def check_key_rate(self, principal: Principal, now: float) -> None:
        if not principal.account:
            return
        wait = self.key_rate.take(principal.account, now)
        if wait:
            raise RateLimited("too many requests for this API key; retry later", wait)

    def auth_failed(self, ip: str, now: float) -> None:
        """Count a 401 against the address; once its allowance is spent it is locked out
        (``check_rate``) until the allowance refills."""
        self.auth_failures.take(address_bucket(ip), now)

    def check_origin(self, headers: Headers) -> None:
        """Browsers always send Origin on a WebSocket upgrade; other clients need not."""
        if not self.origins:
            return
        for origin in headers.get_all("Origin"):
            if normalize_origin(origin) not in self.origins:
                raise OriginNotAllowed("this page's origin may not use the service")

    @staticmethod
    def credential(request: Request) -> str | None:
        """``Authorization: Bearer``, else a ``bearer.<token>`` subprotocol, else ``?token=``."""
        auth = request.headers.get_all("Authorization")
        if len(auth) > 1:
            raise Unauthorized("send one Authorization header")
        if auth:
            scheme, _, value = auth[0].strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("use 'Authorization: Bearer <key or token>'")
            return value.strip()
        for line in request.headers.get_all("Sec-WebSocket-Protocol"):
            for item in line.split(","):
                item = item.strip()
                if item.lower().startswith(BEARER_PROTOCOL_PREFIX):
                    return item[len(BEARER_PROTOCOL_PREFIX):]
        values = parse_qs(urlsplit(request.path).query, max_num_fields=64).get("token")
        return values[-1] if values else None

    def authenticate(self, request: Request, *, opens_session: bool,
                     allow_tokens: bool = True) -> Principal:
        """The principal, or Unauthorized. A token opening a session must still be inside
        its first-use window; it is consumed separately (``consume``), after the caps."""
        if not self.required:
            return ANONYMOUS
        try:
            credential = self.credential(request)
        except ValueError:  # too many query fields
            raise Unauthorized("malformed credentials") from None
        if not credential:
            raise Unauthorized("authentication required: an API key or a session token "
                               "(Authorization: Bearer, a bearer.<token> subprotocol, "
                               "or ?token=)")
        if looks_like_token(credential):
            if not allow_tokens:
                raise Unauthorized("this endpoint needs an API key, not a session token")
            claims = self.tokens.verify(credential)
            now = time.time()
            if now > (claims.exp if opens_session else claims.usable_until):
                raise Unauthorized("token expired")
            return claims.principal()
        name = self.keys.lookup(credential)
        if name is None:
            raise Unauthorized("invalid API key")
        return key_principal(name)

    async def consume(self, principal: Principal, *, dry_run: bool = False) -> None:
        """A token's first use: opens its one session (SET NX). ``dry_run`` only reports a
        token that was already used (a plain GET probing why an upgrade failed)."""
        if principal.kind != "token":
            return
        key = keys.token_nonce(principal.nonce)
        if dry_run:
            if await self.redis.exists(key):
                raise Unauthorized("token already used or revoked")
            return
        # After its first-use window the token cannot open a session anyway, so the nonce
        # only has to outlive that window (plus a margin for clocks that disagree).
        ttl = max(1, math.ceil(principal.token_exp - time.time())) + NONCE_MARGIN_S
        # A value of this use's own: when redis-py sends the SET again because its reply was
        # lost, the value it finds is its own first try, not another use.
        mine = TOKEN_USED + b":" + uuid.uuid4().hex.encode()
        before = await self.redis.set(key, mine, nx=True, ex=ttl, get=True)
        if before is not None and before != mine:
            raise Unauthorized("token revoked" if before == TOKEN_REVOKED
                               else "token already used")

    async def revoke(self, claims: TokenClaims) -> bool:
        """Make an unused token unable to open a session: its nonce is set the way its first
        use would set it (SET NX, so a use and a revocation racing cannot both win), for the
        rest of its first-use window. False when it had already opened its session (that
        session is not ended; the token still resumes and views it)."""
        left = math.ceil(claims.exp - time.time())
        if left <= 0:
            return True  # past its first-use window: it can open nothing any more
        before = await self.redis.set(keys.token_nonce(claims.nonce), TOKEN_REVOKED, nx=True,
                                      ex=left + NONCE_MARGIN_S, get=True)
        return before is None or before == TOKEN_REVOKED

    async def admit(self, connection: object, request: Request, *, opens_session: bool,
                    caps: tuple[int, int] | None = None, allow_tokens: bool = True,
                    member: str | None = None) -> Principal:
        """Every check for one request, in order: the address's request rate and failed
        authentications (429), Origin (403), credentials (401), the API key's request rate
        (429), the session caps (429, WebSocket upgrades with ``caps`` only), a token's first
        use (401). An upgrade's principal and cap lease wait in ``take`` for its handler.

        ``member`` is what the caps count: the id of the session the upgrade opens or
        resumes (a fresh id when None)."""
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        ip = self.request_ip(connection, request)
        now = time.monotonic()
        self.check_rate(ip, now)
        self.check_origin(request.headers)
        try:
            principal = self.authenticate(request, opens_session=opens_session,
                                          allow_tokens=allow_tokens)
        except Unauthorized:
            self.auth_failed(ip, now)
            raise
        self.check_key_rate(principal, now)
        lease = None
        if upgrade and caps is not None:
            lease = await self.acquire(ip, principal, *caps, member=member)
        if opens_session:
            try:
                await self.consume(principal, dry_run=not upgrade)
            except BaseException as exc:
                if lease is not None:
                    await self.release(lease)
                if isinstance(exc, Unauthorized):
                    self.auth_failed(ip, now)
                raise
        if upgrade:
            self._conns[connection] = Admitted(principal, lease, time.monotonic())
        return principal

    def take(self, connection: object) -> tuple[Principal, str | None]:
        """The principal and cap lease that ``admit`` stored for this connection."""
        found = self._conns.pop(connection, None)
        if found is None:  # not admitted: never fall back to anonymous when auth is on
            if self.required:
                raise Unauthorized("authentication required")
            return ANONYMOUS, None
        return found.principal, found.lease

    async def process_response(self, connection: object, request: Request,
                               response: Response) -> None:
        """websockets' process_response hook: an upgrade that failed after ``admit``
        (a bad handshake) frees what it was given; a 101 starts the wait for its handler."""
        if response.status_code != 101:
            found = self._conns.pop(connection, None)
            if found is not None and found.lease is not None:
                await self.release(found.lease)
            return
        admitted = self._conns.get(connection)
        if admitted is not None:
            admitted.at, admitted.answered = time.monotonic(), True

    async def _sweep(self) -> None:
        """Upgrades whose handler never ran: the client vanished right after the 101 (the
        handler starts at once otherwise), or the handshake never finished."""
        now = time.monotonic()
        for connection, admitted in list(self._conns.items()):
            age = now - admitted.at
            if age > (HANDLER_START_S if admitted.answered else HANDSHAKE_LIMIT_S):
                del self._conns[connection]
                if admitted.lease is not None:
                    await self.release(admitted.lease)

    # ------------------------------------------------------------------ session caps

    async def acquire(self, ip: str, principal: Principal, ip_cap: int, key_cap: int,
                      member: str | None = None) -> str:
        """Count a session (``member``: its id; a fresh id when None) against its address and
        its API key; a local handle to settle later (``release``, ``forget``).
        TooManySessions when either is at its cap. A member already counted (a session
        resumed within its resume grace) is refreshed, not counted again."""
        member = member or uuid.uuid4().hex
        handle = uuid.uuid4().hex
        now = time.time()
        hold = CapHold(member, [], [])
        wanted = [(keys.connections("ip", address_bucket(ip)), ip_cap,
                   "too many sessions from this address")]
        if principal.account:
            wanted.append((keys.connections("key", principal.account), key_cap,
                           "too many sessions for this API key"))
        try:
            for key, cap, message in wanted:
                got = int(await self._acquire(keys=[key], args=[
                    f"{now:.3f}", f"{now + self.lease_s:.3f}", member, cap,
                    math.ceil(self.lease_s * 2)]))
                if not got:
                    raise TooManySessions(message)
                hold.keys.append(key)
                if got == 1:
                    hold.added.append(key)
        except BaseException:
            await self._remove(member, hold.added)
            raise
        self._held[handle] = hold
        return handle

    def member(self, handle: str | None) -> str | None:
        """The member (session id) a lease counts."""
        hold = self._held.get(handle) if handle is not None else None
        return hold.member if hold is not None else None

    async def release(self, handle: str, *, session_closed: bool = False) -> None:
        """Stop counting: the member leaves the sets where this lease added it or, once its
        session's stream is closed (``session_closed``), every set it was counted in."""
        hold = self._held.pop(handle, None)
        if hold is not None:
            await self._remove(hold.member, hold.keys if session_closed else hold.added)

    def forget(self, handle: str) -> None:
        """Drop a lease without touching Redis: another holder has its member now (the
        session was resumed on another connection), or nobody can tell (its lease runs
        out by itself unless a live holder renews it)."""
        self._held.pop(handle, None)

    async def _remove(self, member: str, where: list[str]) -> None:
        if not where:
            return
        with contextlib.suppress(*REDIS_DOWN):  # the lease expires on its own
            pipe = self.redis.pipeline(transaction=False)
            for key in where:
                pipe.zrem(key, member)
            await pipe.execute()

    async def renew_forever(self, every_s: float) -> None:
        """Keep the leases of this process's sessions fresh (one pipeline per round). A plain
        ZADD, not XX: a member that a stale holder removed is restored by its live one."""
        while True:
            await asyncio.sleep(every_s)
            await self._sweep()
            if not self._held:
                continue
            expiry = f"{time.time() + self.lease_s:.3f}"
            try:
                pipe = self.redis.pipeline(transaction=False)
                for hold in list(self._held.values()):
                    for key in hold.keys:
                        pipe.zadd(key, {hold.member: expiry})
                        pipe.expire(key, math.ceil(self.lease_s * 2))
                await pipe.execute()
            except REDIS_DOWN as exc:
                log.warning("session caps: lease renewal failed: %s", exc)
