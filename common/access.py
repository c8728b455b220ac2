"""Checks made on every HTTP request before a WebSocket upgrade: request rates, Origin,
credentials, the client's address, and the per-address and per-key caps on concurrent
sessions; and the per-address connection counts checked when a connection is accepted
(``PeerLimits``, applied by ``common/serving.py``).

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
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from multidict import CIMultiDictProxy

from common import keys
from common.audio import TARGET_RATE
from common.auth import (
    ANONYMOUS,
    ApiKeys,
    Principal,
    TokenClaims,
    TokenSigner,
    key_principal,
    looks_like_key,
    looks_like_token,
)
from common.errors import (
    BadRequest,
    MethodNotAllowed,
    OriginNotAllowed,
    QuotaExceeded,
    RateLimited,
    SttError,
    TooManySessions,
    TooManyViewers,
    Unauthorized,
)
from common.ratelimit import BucketMap
from common.redis_client import REDIS_DOWN
from common.scripts import CAP_ACQUIRE
from common.settings import AccessSettings
from common.tenants import (
    KeyStore,
    Quotas,
    audio_quota_left,
    seconds_to_midnight,
    tenant_quotas,
)

if TYPE_CHECKING:
    from aiohttp.web import BaseRequest

Headers = CIMultiDictProxy[str]

log = logging.getLogger(__name__)

#: ``Authorization`` schemes that carry an API key or a session token: ``Token`` is the one
#: Deepgram's SDKs send.
AUTH_SCHEMES = ("bearer", "token")
#: Subprotocol a browser offers besides ``bearer.<token>``; the server selects it, so the
#: credential is never echoed back.
SUBPROTOCOL = "stt"
BEARER_PROTOCOL_PREFIX = "bearer."
#: Deepgram's browser SDKs offer ``token`` and the key as the next subprotocol.
TOKEN_PROTOCOL = "token"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Values of a token's nonce key (``keys.token_nonce``): it opened its session, or it was
#: revoked before it could.
TOKEN_USED = b"used"
TOKEN_REVOKED = b"revoked"
#: A nonce key outlives its token's first-use window by this much (clocks that disagree).
NONCE_MARGIN_S = 60


#: Request headers that may appear once: with two, the proxy, these checks and the WebSocket
#: layer could each read another one.
SINGLE_HEADERS = ("Host", "Upgrade", "Connection", "Sec-WebSocket-Key",
                  "Sec-WebSocket-Version", "Authorization", "Origin")
#: Refused connections are logged at most once per this many seconds (with a count).
REFUSED_LOG_INTERVAL_S = 60.0


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


def check_single_headers(headers: Headers) -> None:
    """BadRequest for a request that repeats a header that must appear once."""
    for name in SINGLE_HEADERS:
        if len(headers.getall(name, ())) > 1:
            raise BadRequest(f"send one {name} header")


# --------------------------------------------------------------------------- per-address caps


class LocalCounts:
    """Things one client address and one API key hold at once in this process (viewer
    sockets), each against its cap (0: none)."""

    def __init__(self, ip_cap: int, key_cap: int) -> None:
        self.ip_cap = ip_cap
        self.key_cap = key_cap
        self.by_ip: dict[str, int] = {}
        self.by_key: dict[str, int] = {}

    def acquire(self, bucket: str, account: str) -> tuple[str, str]:
        """A slot for ``bucket`` (an address, see ``address_bucket``) and ``account`` (an API
        key's name; "" for none), or TooManyViewers."""
        if self.ip_cap > 0 and self.by_ip.get(bucket, 0) >= self.ip_cap:
            raise TooManyViewers(f"too many viewers from this address (at most {self.ip_cap})")
        if account and self.key_cap > 0 and self.by_key.get(account, 0) >= self.key_cap:
            raise TooManyViewers(f"too many viewers for this API key (at most {self.key_cap})")
        self.by_ip[bucket] = self.by_ip.get(bucket, 0) + 1
        if account:
            self.by_key[account] = self.by_key.get(account, 0) + 1
        return bucket, account

    def release(self, slot: tuple[str, str]) -> None:
        bucket, account = slot
        _decrement(self.by_ip, bucket)
        if account:
            _decrement(self.by_key, account)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def connection_caps(settings: AccessSettings, caps_per_ip: Sequence[int]) -> tuple[int, int]:
    """(handshakes, connections) one client address may have open at once; 0: no limit.
    ``caps_per_ip``: this server's per-address caps on sockets that stay open (sessions,
    viewers), for the automatic connection cap."""
    handshakes = settings.max_handshakes_per_ip
    if handshakes < 0:  # auto: as many as the address may start at once
        handshakes = math.ceil(settings.rate_limit_ip_burst) \
            if settings.rate_limit_ip_per_s > 0 else 0
    connections = settings.max_connections_per_ip
    if connections < 0:  # auto: its sockets twice over (resumes, closing ones), + handshakes
        if handshakes <= 0 or any(cap <= 0 for cap in caps_per_ip):
            connections = 0
        else:
            connections = 2 * sum(caps_per_ip) + handshakes
    return handshakes, connections


class PeerLimits:
    """Connections and unanswered requests per peer address (IPv6 by /64), checked when a
    connection is accepted, before anything is read, and the size of a request's headers.
    Trusted proxies are exempt: every client behind one shares its address (the proxy
    bounds its clients' connections)."""

    def __init__(self, max_handshakes: int, max_connections: int, max_request_bytes: int,
                 exempt: Sequence[IPNetwork] = ()) -> None:
        self.max_handshakes = max_handshakes
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.exempt = list(exempt)
        self.connections: dict[str, int] = {}
        self.handshakes: dict[str, int] = {}
        self.refused = 0  # since the last log line about it
        self._log_after = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.max_handshakes > 0 or self.max_connections > 0

    def bucket(self, peername: Any) -> str | None:
        """What the caps count for this peer; None: not counted (a trusted proxy, a Unix
        socket)."""
        if not self.enabled or not isinstance(peername, tuple) or not peername:
            return None
        addr = _address(str(peername[0]))
        if addr is None or any(addr in net for net in self.exempt):
            return None
        return address_bucket(str(addr))

    def open(self, bucket: str) -> bool:
        """Count a new connection (and its handshake); False when it is over a cap."""
        if (self.max_connections > 0
                and self.connections.get(bucket, 0) >= self.max_connections) or (
                self.max_handshakes > 0
                and self.handshakes.get(bucket, 0) >= self.max_handshakes):
            self._refused(bucket)
            return False
        self.connections[bucket] = self.connections.get(bucket, 0) + 1
        self.handshakes[bucket] = self.handshakes.get(bucket, 0) + 1
        return True

    def answered(self, bucket: str) -> None:
        _decrement(self.handshakes, bucket)

    def closed(self, bucket: str) -> None:
        _decrement(self.connections, bucket)

    def _refused(self, bucket: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._log_after:
            self._log_after = now + REFUSED_LOG_INTERVAL_S
            log.warning("refused %d connection(s) over the per-address caps (%d open, %d "
                        "unanswered at most; the last from %s)", self.refused,
                        self.max_connections, self.max_handshakes, bucket)
            self.refused = 0


@dataclasses.dataclass
class CapHold:
    """One local holder of a cap member: a connection, or a detached session waiting out its
    resume grace. Several holders (on one gateway or on several) may hold the same member,
    a session id: a resumed session is counted once."""

    member: str
    keys: list[str]  # the connections sets it holds the member in
    added: list[str]  # those where this holder added it (not found it already there)


@dataclasses.dataclass
class Admission:
    """What ``admit`` gave a request: its principal, and what the handler must give back
    however the request ends: the session caps' lease (``release``, or handed to the
    session that keeps it) and a viewer's slot (``release_viewer``)."""

    principal: Principal
    lease: str | None = None
    viewer: tuple[str, str] | None = None


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """Select ``stt`` when offered (a browser sending ``bearer.<token>`` must offer it:
    browsers fail a handshake whose response selects none of the offered ones), else
    ``token`` (Deepgram's browser clients offer ``token`` and then the key). The
    credential-carrying entry is never selected, so never echoed."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return TOKEN_PROTOCOL if _token_protocol_key(offered) is not None else None


def _token_protocol_key(offered: Sequence[str]) -> str | None:
    """The key after a ``token`` entry of ``Sec-WebSocket-Protocol`` (Deepgram's browser
    SDKs send ``token, <key>``), or None."""
    items = [item.strip() for item in offered]
    for i, item in enumerate(items[:-1]):
        if item.lower() == TOKEN_PROTOCOL and items[i + 1]:
            return items[i + 1]
    return None


class AccessGuard:
    """Origin allowlist, authentication, and session caps for one server process."""

    def __init__(self, settings: AccessSettings, redis: aioredis.Redis,
                 lease_s: float = 30.0) -> None:
        if settings.auth not in ("required", "off"):
            raise ValueError("AUTH must be 'required' or 'off'")
        self.required = settings.auth == "required"
        self.keys = ApiKeys(settings.api_keys)
        if settings.api_key_store not in ("on", "off"):
            raise ValueError("API_KEY_STORE must be 'on' or 'off'")
        #: keys made with ``python -m common.tenants``, looked up in Redis
        self.key_store = KeyStore(redis) if settings.api_key_store == "on" else None
        self.quota_defaults = Quotas(settings.tenant_max_sessions,
                                     settings.tenant_audio_hours_per_day)
        self.tokens = TokenSigner(settings.token_secret)
        self.origins = {normalize_origin(o) for o in settings.allowed_origins.split(",")
                        if o.strip()}
        self.proxies = parse_networks(settings.trusted_proxies)
        self.redis = redis
        self.lease_s = lease_s
        self._acquire = redis.register_script(CAP_ACQUIRE)
        # Cap leases of this process: local handle -> the member it holds and where.
        self._held: dict[str, CapHold] = {}
        self.ip_rate = BucketMap(settings.rate_limit_ip_per_s, settings.rate_limit_ip_burst,
                                 settings.rate_limit_buckets)
        self.key_rate = BucketMap(settings.rate_limit_key_per_s, settings.rate_limit_key_burst,
                                  settings.rate_limit_buckets)
        self.auth_failures = BucketMap(settings.auth_failures_per_min / 60.0,
                                       settings.auth_failure_burst, settings.rate_limit_buckets)
        self.settings = settings
        # Viewer sockets per address and per key (caps given by SessionsApi's settings).
        self.viewers = LocalCounts(getattr(settings, "max_viewers_per_ip", 0),
                                   getattr(settings, "max_viewers_per_key", 0))

    def peer_limits(self, caps_per_ip: Sequence[int]) -> PeerLimits:
        """The per-address connection limits of a server whose sockets that stay open are
        capped per address at ``caps_per_ip`` (sessions, viewers)."""
        handshakes, connections = connection_caps(self.settings, caps_per_ip)
        return PeerLimits(handshakes, connections, self.settings.max_request_header_bytes,
                          self.proxies)

    def describe(self) -> str:
        if not self.required:
            return "AUTHENTICATION IS OFF: anyone who can reach this port may use it"
        if not len(self.keys) and not self.tokens.enabled and self.key_store is None:
            return ("AUTH=required but no API_KEYS and no TOKEN_SECRET: every /v1 request "
                    "will be refused (python -m common.auth new-key, or AUTH=off locally)")
        return (f"authentication required: {len(self.keys)} API key(s) configured, keys in "
                f"Redis {'on' if self.key_store is not None else 'off'}, session tokens "
                f"{'on' if self.tokens.enabled else 'off'}")

    # ------------------------------------------------------------------ request checks

    def client_ip(self, peer: str, headers: Headers) -> str:
        if not self.proxies:
            return peer
        return client_address(peer, headers.getall("X-Forwarded-For", ()), self.proxies)

    def request_ip(self, request: BaseRequest) -> str:
        """The client's address: the peer's, or the one a trusted proxy forwarded."""
        return self.client_ip(request.remote or "", request.headers)

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
        for origin in headers.getall("Origin", ()):
            if normalize_origin(origin) not in self.origins:
                raise OriginNotAllowed("this page's origin may not use the service")

    @staticmethod
    def credential(request: BaseRequest) -> str | None:
        """``Authorization: Bearer`` (or ``Token``, as Deepgram's clients send it), else a
        ``bearer.<token>`` subprotocol (or ``token`` and the key: Deepgram's browser
        clients), else ``?token=``."""
        auth = request.headers.getall("Authorization", ())
        if len(auth) > 1:
            raise Unauthorized("send one Authorization header")
        if auth:
            scheme, _, value = auth[0].strip().partition(" ")
            if scheme.lower() not in AUTH_SCHEMES or not value.strip():
                raise Unauthorized("use 'Authorization: Bearer <key or token>'")
            return value.strip()
        offered = [item.strip() for line in request.headers.getall("Sec-WebSocket-Protocol", ())
                   for item in line.split(",")]
        for item in offered:
            if item.lower().startswith(BEARER_PROTOCOL_PREFIX):
                return item[len(BEARER_PROTOCOL_PREFIX):]
        key = _token_protocol_key(offered)
        if key is not None:
            return key
        values = parse_qs(urlsplit(request.raw_path).query, max_num_fields=64).get("token")
        return values[-1] if values else None

    async def authenticate(self, request: BaseRequest, *, opens_session: bool,
                           allow_tokens: bool = True, credential: str | None = None,
                           ) -> Principal:
        """The principal, or Unauthorized. A token opening a session must still be inside
        its first-use window; it is consumed separately (``consume``), after the caps.
        ``credential``: one the protocol carried after the upgrade (Twilio's
        ``customParameters``), instead of the request's. An API key is looked up in
        ``API_KEYS``, then in Redis (``common/tenants.py``)."""
        if not self.required:
            return ANONYMOUS
        try:
            credential = credential or self.credential(request)
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
        record = self.keys.lookup(credential)
        if record is None and self.key_store is not None and looks_like_key(credential):
            record = await self.key_store.lookup(credential)
        if record is None:
            raise Unauthorized("invalid API key")
        return key_principal(record)

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

    async def admit(self, request: BaseRequest, *, opens_session: bool,
                    caps: tuple[int, int] | None = None, allow_tokens: bool = True,
                    member: str | None = None, viewer: bool = False,
                    methods: tuple[str, ...] = ("GET",),
                    method_message: str | None = None,
                    credential: str | None = None) -> Admission:
        """Every check for one request, in order: the address's request rate and failed
        authentications (429), headers that must appear once (400), Origin (403),
        credentials (401), the API key's request rate (429), the method (405: one of
        ``methods``), the session caps (429, WebSocket upgrades with ``caps`` only) or, for
        a ``viewer`` upgrade, the viewer caps (429), a token's first use (401). The
        ``Admission`` holds what the handler gives back when the request ends.

        ``member`` is what the caps count: the id of the session the upgrade opens or
        resumes (a fresh id when None)."""
        ip = self.request_ip(request)
        now = time.monotonic()
        self.check_rate(ip, now)
        check_single_headers(request.headers)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        self.check_origin(request.headers)
        try:
            principal = await self.authenticate(request, opens_session=opens_session,
                                                allow_tokens=allow_tokens,
                                                credential=credential)
        except Unauthorized:
            self.auth_failed(ip, now)
            raise
        self.check_key_rate(principal, now)
        if request.method not in methods:
            raise MethodNotAllowed(method_message or f"use {' or '.join(methods)}",
                                   allow=methods)
        admission = Admission(principal)
        if upgrade and caps is not None:
            admission.lease = await self.acquire(ip, principal, *caps, member=member)
        if upgrade and viewer:
            admission.viewer = self.viewers.acquire(address_bucket(ip), principal.account)
        if opens_session:
            try:
                await self.consume(principal, dry_run=not upgrade)
            except BaseException as exc:
                await self.settle(admission)
                if isinstance(exc, Unauthorized):
                    self.auth_failed(ip, now)
                raise
        return admission

    async def settle(self, admission: Admission) -> None:
        """Give back what ``admit`` took for a request that has ended (its lease, unless a
        session took it over and cleared it; its viewer slot)."""
        lease, admission.lease = admission.lease, None
        if lease is not None:
            await self.release(lease)
        self.release_viewer(admission)

    def release_viewer(self, admission: Admission) -> None:
        slot, admission.viewer = admission.viewer, None
        if slot is not None:
            self.viewers.release(slot)

    # ------------------------------------------------------------------ session caps

    async def acquire(self, ip: str, principal: Principal, ip_cap: int, key_cap: int,
                      member: str | None = None) -> str:
        """Count a session (``member``: its id; a fresh id when None) against its address, its
        API key and its tenant; a local handle to settle later (``release``, ``forget``).
        TooManySessions when the address or the key is at its cap, QuotaExceeded when the
        tenant is at its quota (``tenant_max_sessions``, or its own). A member already
        counted (a session resumed within its resume grace) is refreshed, not counted
        again."""
        member = member or uuid.uuid4().hex
        handle = uuid.uuid4().hex
        now = time.time()
        hold = CapHold(member, [], [])
        wanted: list[tuple[str, int, SttError]] = [
            (keys.connections("ip", address_bucket(ip)), ip_cap,
             TooManySessions("too many sessions from this address"))]
        if principal.account:
            wanted.append((keys.connections("key", principal.account), key_cap,
                           TooManySessions("too many sessions for this API key")))
        quotas = await tenant_quotas(self.redis, principal.tenant, self.quota_defaults)
        if not await audio_quota_left(self.redis, principal.tenant,
                                      round(quotas.audio_hours_per_day * 3600 * TARGET_RATE)):
            raise QuotaExceeded("this tenant's audio for the day is spent",
                                seconds_to_midnight(time.time()))
        if quotas.max_sessions > 0:
            wanted.append((keys.connections("tenant", principal.tenant), quotas.max_sessions,
                           QuotaExceeded(f"this tenant has its {quotas.max_sessions} "
                                         "concurrent sessions open",
                                         self.settings.quota_retry_after_s)))
        try:
            for key, cap, refusal in wanted:
                got = int(await self._acquire(keys=[key], args=[
                    f"{now:.3f}", f"{now + self.lease_s:.3f}", member, cap,
                    math.ceil(self.lease_s * 2)]))
                if not got:
                    raise refusal
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
