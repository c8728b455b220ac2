"""Admission (common/access.py): the client address behind trusted proxies, the bucket an
address is counted in, and the checks AccessGuard makes before it serves a request: request
rates per address and per API key, and the lockout after failed authentications (no
sockets, no Redis traffic).

tests/test_security.py and tests/test_bounds.py drive them through a real gateway.
"""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from common.access import AccessGuard, address_bucket, client_address, parse_networks
from common.auth import hash_key, new_key
from common.errors import RateLimited, Unauthorized
from common.settings import AccessSettings
from common.web import error_response

TRUSTED = parse_networks("127.0.0.1, 10.0.0.0/8")


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # not a proxy: header ignored
    ("127.0.0.1", ["1.2.3.4"], "1.2.3.4"),
    ("127.0.0.1", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # left part written by the client
    ("127.0.0.1", ["1.2.3.4, 10.1.1.1"], "1.2.3.4"),  # through two trusted proxies
    ("127.0.0.1", ["1.2.3.4", "10.1.1.1"], "1.2.3.4"),  # the header repeated
    ("127.0.0.1", ["garbage"], "127.0.0.1"),
    ("127.0.0.1", [], "127.0.0.1"),
    ("::ffff:127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
])
def test_client_address_trusts_forwarded_for_only_from_trusted_proxies(
        peer: str, forwarded: list[str], expected: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == expected


def test_ipv6_clients_are_capped_per_64() -> None:
    assert address_bucket("2001:db8:1:2::1") == address_bucket("2001:db8:1:2:ffff::9")
    assert address_bucket("2001:db8:1:3::1") != address_bucket("2001:db8:1:2::1")
    assert address_bucket("192.0.2.1") == "192.0.2.1"


# --------------------------------------------------------------------------- AccessGuard

KEY, OTHER = new_key(), new_key()


def request(path: str, ip: str, headers: list[tuple[str, str]] | None = None,
            method: str = "GET") -> web.BaseRequest:
    """A request from client address ``ip`` (no socket)."""
    return make_mocked_request(method, path, headers=CIMultiDict(headers or [])).clone(
        remote=ip)


def guard(**limits: float) -> AccessGuard:
    settings = AccessSettings(auth="required",
                              api_keys=f"app={hash_key(KEY)},other={hash_key(OTHER)}",
                              api_key_store="off",  # keys kept in Redis: test_tenants.py
                              **limits)  # type: ignore[arg-type]
    return AccessGuard(settings, aioredis.Redis())  # never connects: no caps, no tokens


async def admit(g: AccessGuard, ip: str, key: str | None = KEY) -> str:
    headers = [("Authorization", f"Bearer {key}")] if key else []
    try:
        await g.admit(request("/v1/sessions", ip, headers), opens_session=False)
    except (RateLimited, Unauthorized) as exc:
        return exc.code
    return "ok"


async def test_requests_from_one_address_are_limited_and_others_are_not() -> None:
    g = guard(rate_limit_ip_per_s=1.0, rate_limit_ip_burst=3, rate_limit_key_per_s=0)
    assert [await admit(g, "10.0.0.1") for _ in range(4)] == ["ok"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.0.2") == "ok"


async def test_ipv6_clients_share_a_bucket_per_64() -> None:
    g = guard(rate_limit_ip_per_s=1.0, rate_limit_ip_burst=2, rate_limit_key_per_s=0)
    assert await admit(g, "2001:db8::1") == "ok"
    assert await admit(g, "2001:db8::ffff:2") == "ok"
    assert await admit(g, "2001:db8::3") == "rate_limited"
    assert await admit(g, "2001:db8:0:1::1") == "ok"


async def test_requests_for_one_api_key_are_limited_across_addresses() -> None:
    g = guard(rate_limit_key_per_s=1.0, rate_limit_key_burst=3)
    got = [await admit(g, f"10.0.1.{i}") for i in range(4)]
    assert got == ["ok"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.1.9", OTHER) == "ok"


async def test_failed_authentications_lock_the_address_out() -> None:
    g = guard(auth_failures_per_min=6.0, auth_failure_burst=3)
    wrong = new_key()
    got = [await admit(g, "10.0.2.1", wrong) for _ in range(4)]
    assert got == ["unauthorized"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.2.1") == "rate_limited"  # even with the right key now
    assert await admit(g, "10.0.2.2") == "ok"


async def test_rate_limited_response_has_retry_after_and_the_json_error() -> None:
    g = guard(rate_limit_ip_per_s=0.1, rate_limit_ip_burst=1)
    await admit(g, "10.0.3.1")
    with pytest.raises(RateLimited) as exc:
        await g.admit(request("/v1/listen", "10.0.3.1"), opens_session=True)
    response = error_response(exc.value)
    assert response.status == 429
    assert 9 <= int(response.headers["Retry-After"]) <= 10
    assert isinstance(response.body, bytes)
    body = json.loads(response.body)
    assert body["type"] == "error" and body["code"] == "rate_limited" and body["message"]
