"""API keys and session tokens (common/auth.py): matching, signing, rotation, who may
resume and read which session, the new-key command.

Unit tests of the I/O-free pieces; tests/test_security.py drives them through a real
gateway. Client addresses: tests/test_access.py; log redaction: tests/test_logs.py.
"""

from __future__ import annotations

import base64
import io
import json
from contextlib import redirect_stdout

import pytest

from common.auth import (
    DEFAULT_TENANT,
    ApiKeys,
    KeyRecord,
    TokenSigner,
    hash_key,
    key_principal,
    main,
    new_key,
)
from common.errors import Unauthorized

SECRET = "s" * 40


def test_api_keys_are_matched_by_hash_and_named() -> None:
    a, b = new_key(), new_key()
    keys = ApiKeys(f"alice={hash_key(a)}, {hash_key(b)}")
    assert keys.lookup(a) == KeyRecord("alice", DEFAULT_TENANT, ())
    assert keys.lookup(b).name == hash_key(b).removeprefix("sha256:")[:8]
    assert keys.lookup(a + "x") is None
    assert keys.lookup("") is None
    assert keys.lookup("x" * 10_000) is None


@pytest.mark.parametrize("config", [
    "alice=md5:abcd", "alice=sha256:xyz", "bad name=sha256:" + "0" * 64,
    f"a=sha256:{'0' * 64};tenant=bad name", f"a=sha256:{'0' * 64};scopes=root",
    f"a=sha256:{'0' * 64};owner=x",
    f"a=sha256:{'0' * 64},a=sha256:{'1' * 64}", "stt_plaintextkeyinsteadofahash",
])
def test_bad_api_key_config_is_refused_at_startup(config: str) -> None:
    with pytest.raises(ValueError):
        ApiKeys(config)


def test_tokens_verify_and_carry_their_claims() -> None:
    signer = TokenSigner(SECRET)
    token, claims = signer.mint("alice", 60, 300, now=1000.0)
    got = signer.verify(token)
    assert got == claims
    assert got.exp == 1060.0 and got.max_session_s == 300 and got.usable_until == 1360.0
    principal = got.principal()
    assert principal.kind == "token" and principal.account == "alice"
    assert principal.owner == f"token:{claims.nonce}"
    assert signer.mint("alice", 60, 300)[1].nonce != claims.nonce


def _tamper(token: str, **changes: object) -> str:
    prefix, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    new_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{new_body}.{sig}"


@pytest.mark.parametrize("forge", [
    lambda t: _tamper(t, max=1e9),  # longer sessions, old signature
    lambda t: _tamper(t, exp=9e9),
    lambda t: _tamper(t, sub="root"),
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
    lambda t: t.split(".")[0] + "." + t.split(".")[1] + ".",  # no signature
    lambda t: TokenSigner("o" * 40).mint("alice", 60, 300)[0],  # another secret
    lambda t: "stt1.!!!.???",
    lambda t: "stt1." + "A" * 600,
])
def test_forged_tokens_are_refused(forge: object) -> None:
    signer = TokenSigner(SECRET)
    token, _ = signer.mint("alice", 60, 300)
    with pytest.raises(Unauthorized):
        signer.verify(forge(token))  # type: ignore[operator]


def test_secret_rotation_verifies_with_every_secret_and_signs_with_the_first() -> None:
    old = TokenSigner("o" * 40)
    token, _ = old.mint("alice", 60, 300)
    rotated = TokenSigner(f"{'n' * 40},{'o' * 40}")
    assert rotated.verify(token).sub == "alice"
    with pytest.raises(Unauthorized):
        old.verify(rotated.mint("alice", 60, 300)[0])


def test_short_token_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenSigner("short")


def test_key_principals_resume_their_own_and_their_tokens_sessions_only() -> None:
    alice, bob = key_principal("alice"), key_principal("bob")
    token = TokenSigner(SECRET).mint("alice", 60, 300)[1].principal()
    other_token = TokenSigner(SECRET).mint("alice", 60, 300)[1].principal()
    assert alice.may_write("key:alice", "alice")
    assert alice.may_write(token.owner, "alice")  # minted by alice
    assert not bob.may_write("key:alice", "alice")
    assert token.may_write(token.owner, "alice")
    assert not other_token.may_write(token.owner, "alice")
    assert not token.may_write("key:alice", "alice")
    assert bob.may_read("key:alice") and not token.may_read("key:alice")


def test_new_key_command_prints_a_key_and_its_entry() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        main(["new-key", "--name", "web"])
    lines = out.getvalue().splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    entry = lines[1].rsplit(" ", 1)[1]
    assert ApiKeys(entry).lookup(key).name == "web"


def test_api_keys_carry_their_tenant_and_scopes() -> None:
    a, b, c = new_key(), new_key(), new_key()
    keys = ApiKeys(f"alice={hash_key(a)};tenant=acme, ops={hash_key(b)};scopes=admin;"
                   f"tenant=root, old={hash_key(c)}")
    assert keys.lookup(a) == KeyRecord("alice", "acme", ())
    assert keys.lookup(b) == KeyRecord("ops", "root", ("admin",))
    assert keys.lookup(c) == KeyRecord("old", DEFAULT_TENANT, ())  # as before tenants
    alice, ops = key_principal(keys.lookup(a)), key_principal(keys.lookup(b))
    assert alice.tenant == "acme" and not alice.admin
    assert ops.admin and ops.sees("acme") and ops.sees("anyone")
    assert alice.sees("acme") and not alice.sees("beta") and not alice.sees("")
    assert key_principal(keys.lookup(c)).sees("")  # a session older than tenants


def test_tokens_carry_their_minting_keys_tenant() -> None:
    signer = TokenSigner(SECRET)
    token, _ = signer.mint("alice", 60, 300, tenant="acme")
    assert signer.verify(token).tenant == "acme"
    principal = signer.verify(token).principal()
    assert principal.tenant == "acme" and not principal.admin
    assert principal.sees("acme") and not principal.sees("beta")
    plain, _ = signer.mint("bob", 60, 300)  # the default tenant: claims as before tenants
    assert "t" not in json.loads(base64.urlsafe_b64decode(plain.split(".")[1] + "=="))
    assert signer.verify(plain).tenant == DEFAULT_TENANT


def test_new_key_command_names_a_tenant_and_scopes() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        main(["new-key", "--name", "ops", "--tenant", "root", "--scopes", "admin"])
    lines = out.getvalue().splitlines()
    key, entry = lines[0].rsplit(" ", 1)[1], lines[1].rsplit(" ", 1)[1]
    assert entry.endswith(";tenant=root;scopes=admin")
    assert ApiKeys(entry).lookup(key) == KeyRecord("ops", "root", ("admin",))
