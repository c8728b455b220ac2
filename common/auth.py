"""API keys, session tokens, and the principal a request acts as (docs/security.md).

API keys are 256-bit random strings (``stt_...``); the configuration holds only their
SHA-256 hashes. A salted slow hash (scrypt, PBKDF2) is what protects low-entropy
passwords from guessing; a 256-bit key cannot be guessed, and a slow hash checked on
every request would hand every client a lever on the gateway's CPU.

Session tokens are for browser pages, which must not hold an API key: a backend calls
``GET /v1/token`` with its key and hands the page a token that

* opens one session (its nonce is consumed atomically in Redis on first use) before
  ``exp``, and afterwards only resumes, views or exports that session;
* limits that session to ``max`` seconds;
* is signed with HMAC-SHA256 under ``TOKEN_SECRET``, so it cannot be forged or altered.

Format: ``stt1.<base64url JSON claims>.<base64url HMAC of "stt1.<claims>">``.

``python -m common.auth new-key`` prints a new key and the hash to configure.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from typing import Any

from common.errors import Unauthorized

KEY_PREFIX = "stt_"
TOKEN_PREFIX = "stt1"
#: Longer credentials are refused before any hashing or decoding.
MAX_CREDENTIAL_CHARS = 512
MIN_SECRET_CHARS = 32
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
#: The tenant of every key that names none (a deployment without tenants has only this one).
DEFAULT_TENANT = "default"
#: Scopes a key may hold: ``admin`` reads every tenant's sessions, usage and the audit trail.
ADMIN = "admin"
SCOPES = (ADMIN,)


def tenant_ok(name: str) -> bool:
    """Tenant names (and key names): 1-64 letters, digits, '_', '.', '-'."""
    return bool(_NAME.fullmatch(name))


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What an API key is: its name (an account: logs, per-key caps), its tenant, its
    scopes."""

    name: str
    tenant: str = DEFAULT_TENANT
    scopes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts as.

    ``account`` is the API key's name (per-key session caps count against it; a token
    counts against the key that minted it). ``owner`` is stored with every session the
    principal creates; resuming a session needs the same owner (or the account's key).
    ``tenant``: whose sessions it sees (a token's is its minting key's); ``admin``: it sees
    every tenant's.
    """

    kind: str  # "anonymous" (auth off) | "key" | "token"
    account: str = ""
    owner: str = ""
    max_session_s: float | None = None  # a token's cap on its session's length
    nonce: str = ""
    token_exp: float = 0.0  # a token's first-use deadline (unix time)
    tenant: str = DEFAULT_TENANT
    admin: bool = False

    def sees(self, tenant: str) -> bool:
        """Does a session of ``tenant`` exist for this principal? Another tenant's session
        answers exactly as one that does not exist (ids cannot be probed)."""
        return self.admin or self.kind == "anonymous" \
            or (tenant or DEFAULT_TENANT) == self.tenant

    def may_write(self, owner: str, account: str) -> bool:
        """May this principal resume (append audio to) a session with this owner (one its
        tenant sees)?"""
        if self.kind == "anonymous":
            return True
        if self.kind == "key":  # its own sessions and those of the tokens it minted
            return not owner or owner == self.owner or account == self.account
        return owner == self.owner

    def may_read(self, owner: str) -> bool:
        """May it view or export a session it sees? API keys: any of their tenant's; a
        token: its own."""
        return self.kind != "token" or owner == self.owner


ANONYMOUS = Principal("anonymous")


def key_principal(record: KeyRecord | str) -> Principal:
    if isinstance(record, str):
        record = KeyRecord(record)
    return Principal("key", account=record.name, owner=f"key:{record.name}",
                     tenant=record.tenant, admin=ADMIN in record.scopes)


# --------------------------------------------------------------------------- API keys


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(sorted({s.strip() for s in text.replace("+", " ").split() if s.strip()}))
    for scope in scopes:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    return scopes


class ApiKeys:
    """The configured key hashes: ``NAME=sha256:HEX`` entries, comma-separated, each
    optionally followed by ``;tenant=T`` and ``;scopes=admin`` (no tenant: ``default``)."""

    def __init__(self, config: str) -> None:
        self._hashes: list[tuple[KeyRecord, bytes]] = []
        for raw in config.split(","):
            entry, *options = [part.strip() for part in raw.strip().split(";")]
            if not entry:
                continue
            tenant, scopes = DEFAULT_TENANT, tuple[str, ...]()
            for option in options:
                field, _, value = option.partition("=")
                if field == "tenant" and tenant_ok(value):
                    tenant = value
                elif field == "scopes":
                    scopes = parse_scopes(value)
                else:
                    raise ValueError("API_KEYS options are ;tenant=NAME and ;scopes=admin")
            name, sep, digest = entry.rpartition("=")
            if not sep:
                name, digest = entry.removeprefix("sha256:")[:8], entry
            scheme, _, hexdigest = digest.partition(":")
            if scheme != "sha256" or not _HEX64.fullmatch(hexdigest):
                raise ValueError("API_KEYS entries must be NAME=sha256:<64 hex digits> "
                                 "(python -m common.auth new-key)")
            if not _NAME.fullmatch(name):
                raise ValueError("API key names are 1-64 letters, digits, '_', '.', '-'")
            if any(r.name == name for r, _ in self._hashes):
                raise ValueError(f"API key name {name!r} is configured twice")
            self._hashes.append((KeyRecord(name, tenant, scopes), bytes.fromhex(hexdigest)))

    def __len__(self) -> int:
        return len(self._hashes)

    def names(self) -> set[str]:
        return {r.name for r, _ in self._hashes}

    def lookup(self, presented: str) -> KeyRecord | None:
        """The key's record, or None. Compares against every entry in constant time."""
        if not presented or len(presented) > MAX_CREDENTIAL_CHARS:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for record, expected in self._hashes:
            if hmac.compare_digest(digest, expected):
                found = record
        return found


# --------------------------------------------------------------------------- session tokens


@dataclasses.dataclass(frozen=True)
class TokenClaims:
    sub: str  # the API key name that minted it
    nonce: str
    exp: float  # unix time: the token must open its session before this
    max_session_s: float  # that session's longest duration
    tenant: str = DEFAULT_TENANT  # the minting key's tenant

    @property
    def usable_until(self) -> float:
        """After its first use a token still resumes and views its session until this."""
        return self.exp + self.max_session_s

    def principal(self) -> Principal:
        return Principal("token", account=self.sub, owner=f"token:{self.nonce}",
                         max_session_s=self.max_session_s, nonce=self.nonce,
                         token_exp=self.exp, tenant=self.tenant)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


#: Characters of a key ``new_key`` makes.
KEY_CHARS = len(KEY_PREFIX) + 43


def looks_like_key(credential: str) -> bool:
    """Shaped like a key ``new_key`` makes (only such keys are kept in Redis)."""
    return len(credential) == KEY_CHARS and credential.startswith(KEY_PREFIX)


def looks_like_token(credential: str) -> bool:
    return credential.startswith(TOKEN_PREFIX + ".")


class TokenSigner:
    """Mints and verifies session tokens; the first secret signs, all verify (rotation)."""

    def __init__(self, config: str) -> None:
        self._secrets = [s.strip().encode() for s in config.split(",") if s.strip()]
        for secret in self._secrets:
            if len(secret) < MIN_SECRET_CHARS:
                raise ValueError(f"TOKEN_SECRET entries need at least {MIN_SECRET_CHARS} "
                                 "characters (python -m common.auth new-secret)")

    @property
    def enabled(self) -> bool:
        return bool(self._secrets)

    def _sign(self, secret: bytes, signed: str) -> bytes:
        return hmac.new(secret, signed.encode(), hashlib.sha256).digest()

    def mint(self, sub: str, ttl_s: float, max_session_s: float,
             now: float | None = None, tenant: str = DEFAULT_TENANT) -> tuple[str, TokenClaims]:
        assert self._secrets, "no token secret"
        now = time.time() if now is None else now
        claims = TokenClaims(sub, secrets.token_urlsafe(16), round(now + ttl_s, 3),
                             float(max_session_s), tenant)
        fields: dict[str, Any] = {"sub": claims.sub, "n": claims.nonce, "exp": claims.exp,
                                  "max": claims.max_session_s}
        if tenant != DEFAULT_TENANT:  # a token of the default tenant reads as before
            fields["t"] = tenant
        body = _b64(json.dumps(fields, separators=(",", ":")).encode())
        signed = f"{TOKEN_PREFIX}.{body}"
        return f"{signed}.{_b64(self._sign(self._secrets[0], signed))}", claims

    def verify(self, token: str) -> TokenClaims:
        """Signature and shape; the caller checks the times for the use it makes."""
        if not self._secrets:
            raise Unauthorized("session tokens are not accepted here")
        if len(token) > MAX_CREDENTIAL_CHARS:
            raise Unauthorized("invalid token")
        prefix, _, rest = token.partition(".")
        body, _, sig = rest.partition(".")
        if prefix != TOKEN_PREFIX or not body or not sig:
            raise Unauthorized("invalid token")
        try:
            signature = _unb64(sig)
        except (ValueError, binascii.Error):
            raise Unauthorized("invalid token") from None
        signed = f"{prefix}.{body}"
        if not any(hmac.compare_digest(self._sign(s, signed), signature)
                   for s in self._secrets):
            raise Unauthorized("invalid token")
        try:
            obj: Any = json.loads(_unb64(body))
            claims = TokenClaims(str(obj["sub"]), str(obj["n"]), float(obj["exp"]),
                                 float(obj["max"]), str(obj.get("t", DEFAULT_TENANT)))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthorized("invalid token") from None
        return claims


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.auth",
        description="Make API keys, their configured hashes, and token secrets.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new-key", help="a new API key and its API_KEYS entry")
    make.add_argument("--name", default="", help="name for the key (logs, per-key limits)")
    hashed = sub.add_parser("hash-key", help="the API_KEYS entry of a key read from stdin")
    hashed.add_argument("--name", default="", help="name for the key")
    for p in (make, hashed):
        p.add_argument("--tenant", default="", help="the key's tenant (default: default)")
        p.add_argument("--scopes", default="", help=f"e.g. {ADMIN}")
    sub.add_parser("new-secret", help="a random TOKEN_SECRET")
    args = parser.parse_args(argv)
    if args.command == "new-secret":
        print(secrets.token_urlsafe(48))
        return
    if (args.name and not _NAME.fullmatch(args.name)) or (
            args.tenant and not tenant_ok(args.tenant)):
        parser.error("names are 1-64 letters, digits, '_', '.', '-'")
    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        parser.error(str(exc))
    options = (f";tenant={args.tenant}" if args.tenant else "") + (
        f";scopes={'+'.join(scopes)}" if scopes else "")
    if args.command == "new-key":
        key = new_key()
        digest = hash_key(key)
        name = args.name or digest.removeprefix("sha256:")[:8]
        print(f"key (give it to the client; it is not stored anywhere): {key}")
        print(f"API_KEYS entry: {name}={digest}{options}")
        return
    key = sys.stdin.readline().strip()
    if not key:
        parser.error("no key on stdin")
    digest = hash_key(key)
    print(f"{args.name or digest.removeprefix('sha256:')[:8]}={digest}{options}")


if __name__ == "__main__":
    main()
